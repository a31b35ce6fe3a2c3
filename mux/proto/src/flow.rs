//! The core's flow-control policy: when consumed data is granted back, how receive windows
//! grow and shrink, how the round trip they are tuned on is measured, and how little a bulk
//! stream keeps in flight beside an interactive one. The state machine (`connection.rs`)
//! keeps the windows and the frames; it asks [`Flow`] what to grant and when to probe, and
//! tells it what arrived. Every tuned number of the core is here, measured on the bench
//! (`cargo bench -p netchan-mux`, see docs/performance.md).

use super::{frame::Header, limits::Limits, stream::Stream};
use std::time::{Duration, Instant};

/// Window updates are sent once the reader has consumed this much (or a quarter of the
/// window, if less): large windows are granted back in steps small enough that the sender
/// never waits for a whole quarter of a big window.
const GRANT_STEP: u32 = 512 * 1024;

/// A window stops growing once it alone lets its stream run this fast (bytes per second) at
/// the measured round trip (window / RTT): 4 GB/s, 32 Gbit/s. Beyond that a bigger window
/// does not make a stream faster, it only lets more of its data queue ahead of every other
/// stream's frames. On loopback (a round trip of tens of microseconds, drained in bursts that
/// look "quick") windows grew to 1–16 MiB without a cap, and a 64-byte round trip beside a
/// bulk channel took 8× its idle time instead of under 4×; a 50 or 100 ms path still grows to
/// its bandwidth-delay product. At 2.5 GB/s the initial 256 KiB window grew only when a
/// round-trip sample happened to exceed 105 µs, so one loopback channel ran at either about
/// 3.9 or 5.7 GB/s from one session to the next; at 4 GB/s it grows above 65 µs, which
/// loopback samples under load reach, and the round trip beside bulk does not move.
const MAX_TUNED_RATE: f64 = 4e9;

/// A data frame this small, on a stream that has not run bulk lately, marks the stream
/// interactive: other streams then keep little in flight (see
/// [`Flow::cap_beside_interactive`]).
const LIGHT_FRAME: u32 = 16 * 1024;

/// A stream that ran bulk this recently does not count as interactive, whatever its frames:
/// the tails of a bulk stream's writes are small too.
pub(crate) const BULK_MEMORY: Duration = Duration::from_millis(100);

/// How long after an interactive stream's last small frame the other streams stay capped
/// (or four round trips, if longer): a stream that exchanges small messages back to back is
/// served by the cap, and a bulk stream gets its whole window back within a millisecond of
/// the last of them.
pub(crate) const INTERACTIVE_HOLD: Duration = Duration::from_millis(1);

/// While another stream is interactive, a stream's cap is at least what lets it run at this
/// rate (bytes per second) at the measured round trip: 500 MB/s, 4 Gbit/s. On loopback that
/// is a few KiB and `window_beside_interactive` decides; across a LAN or WAN it keeps a bulk
/// stream near the link's rate, the queue that delays small frames there being the link's
/// own.
const RATE_BESIDE_INTERACTIVE: f64 = 5e8;

/// Opaque values of our round-trip probes have this bit set; keepalive pings do not.
pub(crate) const PROBE_BIT: u32 = 0x8000_0000;

/// While data flows, a new round-trip probe goes out once the last sample is this old.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// The round trip that windows are tuned on is the smallest sample of this long (or the
/// latest one, once the smallest is older). A sample taken while bulk data queues up on the
/// link is inflated by that very queue, and growing a window on it puts yet more data in
/// the queue: the smallest recent sample breaks that loop, and expiring it lets a link whose
/// path really got longer be followed.
pub(crate) const RTT_WINDOW: Duration = Duration::from_secs(10);

/// An outstanding probe unanswered for this long is given up (a new one may go out).
const PROBE_GIVE_UP: Duration = Duration::from_secs(10);

/// A grown window whose reader takes longer than this many round trips (and at least
/// [`SHRINK_MIN`]) to consume a whole window is not what limits its stream: it gives half of
/// its growth back to the session's budget.
const SHRINK_AFTER_RTTS: u32 = 16;
const SHRINK_MIN: Duration = Duration::from_secs(1);

/// Whether what the reader of `s` consumed is worth a window update.
pub(crate) fn grant_due(s: &Stream) -> bool {
    s.credit >= (s.window / 4).min(GRANT_STEP)
}

/// A window update decided by [`Flow::grant`]: `credit` of the consumed bytes go back to the
/// peer, and the window grows by `extra` or shrinks by `shrink` (at most one is not 0; the
/// update carries `credit + extra - shrink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) credit: u32,
    pub(crate) extra: u32,
    pub(crate) shrink: u32,
}

/// The flow-control policy of one session, and the state it keeps: the round trip and the
/// stream last seen interactive.
#[derive(Debug)]
pub(crate) struct Flow {
    initial_window: u32,
    max_window: u32,
    /// [`Limits::window_beside_interactive`]; 0: no cap.
    window_beside_interactive: u32,
    /// The smallest round-trip time measured with a probe Ping within [`RTT_WINDOW`], and
    /// when it was measured.
    rtt: Option<(Duration, Instant)>,
    /// When the last probe was answered.
    sampled: Option<Instant>,
    /// Our outstanding round-trip probe: its opaque value and when it was queued.
    probe: Option<(u32, Instant)>,
    next_probe: u32,
    /// The last stream that received a small data frame while not running bulk, and when.
    light: Option<(u32, Instant)>,
}

impl Flow {
    pub(crate) fn new(limits: &Limits) -> Flow {
        Flow {
            initial_window: limits.initial_window,
            max_window: limits.max_window,
            window_beside_interactive: limits.window_beside_interactive,
            rtt: None,
            sampled: None,
            probe: None,
            next_probe: 0,
            light: None,
        }
    }

    /// The round trip windows are tuned on, once measured.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.rtt.map(|(rtt, _)| rtt)
    }

    /// A Ping answer carrying `opaque` arrived at `now`: a round-trip sample if it answers
    /// our probe.
    pub(crate) fn on_pong(&mut self, opaque: u32, now: Instant) {
        if let Some((probe, sent)) = self.probe {
            if probe == opaque {
                self.probe = None;
                self.on_rtt_sample(now.saturating_duration_since(sent), now);
            }
        }
    }

    /// A round trip of `sample` measured at `now`: kept if it is the smallest within
    /// [`RTT_WINDOW`], or if the smallest has expired.
    fn on_rtt_sample(&mut self, sample: Duration, now: Instant) {
        let keep = self.rtt.is_some_and(|(min, at)| {
            min <= sample && now.saturating_duration_since(at) <= RTT_WINDOW
        });
        if !keep {
            self.rtt = Some((sample, now));
        }
        self.sampled = Some(now);
    }

    /// Sets the round-trip sample (tests of window tuning).
    #[cfg(test)]
    pub(crate) fn set_rtt(&mut self, rtt: Duration, now: Instant) {
        self.rtt = Some((rtt, now));
        self.sampled = Some(now);
    }

    /// Answers a round-trip probe of ours (tests).
    #[cfg(test)]
    pub(crate) fn probe_answered(&mut self, sent: Instant, now: Instant) {
        self.on_rtt_sample(now.saturating_duration_since(sent), now);
    }

    /// The opaque value of a round-trip probe (a Ping) to send now, when data flows (the
    /// caller asks on every grant) and the last sample is stale, and none is outstanding.
    pub(crate) fn probe_due(&mut self, now: Instant) -> Option<u32> {
        let stale = self
            .sampled
            .is_none_or(|at| now.saturating_duration_since(at) > PROBE_EVERY);
        let outstanding = self
            .probe
            .is_some_and(|(_, sent)| now.saturating_duration_since(sent) < PROBE_GIVE_UP);
        if !stale || outstanding {
            return None;
        }
        let opaque = PROBE_BIT | (self.next_probe & !PROBE_BIT);
        self.next_probe = self.next_probe.wrapping_add(1);
        self.probe = Some((opaque, now));
        Some(opaque)
    }

    /// Notes a data frame `h` that arrived on stream `s` at `now` (`whole`: all of it, not a
    /// piece): whether the stream runs bulk (its window has grown, or its peer has used more
    /// than half of it), or is interactive (a small frame on a stream that has not run bulk
    /// for [`BULK_MEMORY`]).
    pub(crate) fn on_data(&mut self, h: Header, s: &mut Stream, whole: bool, now: Instant) {
        let memory = BULK_MEMORY.max(self.interactive_hold());
        if s.window > self.initial_window || s.recv_window < s.window / 2 {
            s.heavy_at = Some(now);
        } else if whole
            && h.length > 0
            && h.length <= LIGHT_FRAME
            && s.heavy_at
                .is_none_or(|at| now.saturating_duration_since(at) > memory)
        {
            self.light = Some((h.stream, now));
        }
    }

    /// How long other streams stay capped after an interactive stream's last small frame.
    fn interactive_hold(&self) -> Duration {
        INTERACTIVE_HOLD.max(4 * self.rtt().unwrap_or_default())
    }

    /// The most stream `id` may have in flight towards us while another stream is
    /// interactive (it received a data frame of at most [`LIGHT_FRAME`] within
    /// [`INTERACTIVE_HOLD`], and has not run bulk for [`BULK_MEMORY`]), if one is:
    /// `window_beside_interactive`, or what [`RATE_BESIDE_INTERACTIVE`] needs at the
    /// measured round trip, if more. The small frames then queue behind that much of the bulk
    /// data, not behind a whole window. Consumed data beyond it is granted back once the
    /// interactive stream has been quiet for [`INTERACTIVE_HOLD`].
    pub(crate) fn cap_beside_interactive(&self, id: u32, now: Instant) -> Option<u32> {
        let (light, at) = self.light?;
        if self.window_beside_interactive == 0
            || light == id
            || now.saturating_duration_since(at) > self.interactive_hold()
        {
            return None;
        }
        let by_rate = RATE_BESIDE_INTERACTIVE * self.rtt().unwrap_or_default().as_secs_f64();
        Some((by_rate.min(f64::from(u32::MAX)) as u32).max(self.window_beside_interactive))
    }

    /// What to grant stream `id` (`s`, whose reader's credit is due, see [`grant_due`]) at
    /// `now`, with `budget_left` of the session's growth budget; `None` to grant nothing yet.
    /// Restarts the tuning stretch (`s.consumed`, `s.epoch`) when one ends.
    ///
    /// Window tuning: when the reader has drained a whole window within two round trips of
    /// starting it, the window (not the reader) limits the stream, and it doubles, up to the
    /// per-stream maximum, within the budget, and while the window allows less than
    /// [`MAX_TUNED_RATE`] at the measured round trip. So a window grows towards the
    /// bandwidth-delay product of the link, and no further. When a whole grown window takes
    /// the reader much longer than that (see [`SHRINK_AFTER_RTTS`]), the window is not what
    /// limits the stream any more: it halves (never below the initial window), by granting
    /// back less than was consumed, and the growth returns to the budget.
    ///
    /// Beside an interactive stream (see [`Flow::cap_beside_interactive`]) at most the cap is
    /// kept in flight, the rest of the credit held until the cap is lifted, and no tuning
    /// happens (the window is not what limits the stream then). A cap the window does not
    /// reach (as at a WAN's round trip) changes nothing.
    pub(crate) fn grant(
        &self,
        id: u32,
        s: &mut Stream,
        budget_left: usize,
        now: Instant,
    ) -> Option<Grant> {
        let cap = self
            .cap_beside_interactive(id, now)
            .filter(|&cap| cap < s.window);
        if cap.is_some_and(|cap| s.recv_window > cap / 2) {
            return None;
        }
        let mut extra = 0;
        let mut shrink = 0;
        if cap.is_some() {
            s.consumed = 0;
            s.epoch = Some(now);
        } else if s.consumed >= u64::from(s.window) {
            let took = s.epoch.map(|start| now.saturating_duration_since(start));
            let (quick, slow) = match (self.rtt(), took) {
                (Some(rtt), Some(took)) => (
                    took < 2 * rtt && f64::from(s.window) < MAX_TUNED_RATE * rtt.as_secs_f64(),
                    took > (SHRINK_AFTER_RTTS * rtt).max(SHRINK_MIN),
                ),
                _ => (false, false),
            };
            if quick && s.recv.len() == 0 && s.window < self.max_window {
                let room = (self.max_window - s.window) as usize;
                extra = (s.window as usize).min(room).min(budget_left) as u32;
            } else if slow && s.window > self.initial_window {
                // Withheld from this grant (never more than it), so what the peer may send
                // plus what is buffered stays equal to the window.
                shrink = (s.window - (s.window / 2).max(self.initial_window)).min(s.credit);
            }
            s.consumed = 0;
            s.epoch = Some(now);
        }
        let credit = cap.map_or(s.credit, |cap| s.credit.min(cap - s.recv_window));
        Some(Grant {
            credit,
            extra,
            shrink,
        })
    }
}
