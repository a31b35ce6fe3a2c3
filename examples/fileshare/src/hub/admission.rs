//! Admission: the connections the hub holds before they have published.
//!
//! A connection is *pending* from accept until it publishes. Pending connections are capped
//! overall ([`HubOptions::max_pending`](super::HubOptions::max_pending)) and per source address
//! ([`HubOptions::max_pending_per_addr`](super::HubOptions::max_pending_per_addr)). A pending
//! connection is *silent* until its first byte arrives, then *talking* (TLS, hello, publish).
//! The hub looks for that byte when it accepts the connection (a client that speaks at once is
//! talking from the start), and again when it sheds a connection as silent: its task may not
//! have run since the byte came, and a connection found talking then takes a place again as a
//! talking one ([`Admission::readmit`]) if a silent one can be shed for it.
//!
//! At a cap the hub makes room rather than turning the newcomer away, since a flood of silent
//! connections would otherwise lock out every honest client:
//! - at the per-address cap, the oldest silent connection from that address is shed; if every
//!   pending connection from that address is talking, the newcomer is refused ("too many
//!   connections from your address");
//! - at the overall cap, the oldest silent connection is shed, or, if none is silent, the
//!   oldest talking one (it has had the longest to finish its hello and publish).
//!
//! A shed connection's task sees its [`Pending::shed`] token cancelled and closes. Every
//! pending connection holds its place until it publishes, ends, or is shed; the deadlines
//! (`hello_timeout`, `publish_timeout`) bound how long that is.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a newcomer was turned away at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Its address already has its cap of connections, all of them talking.
    TooManyFromAddress {
        /// The per-address cap.
        limit: usize,
    },
}

/// A connection shed to make room for a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shed {
    /// Its source address.
    pub(crate) ip: IpAddr,
    /// Whether it had sent nothing yet.
    pub(crate) silent: bool,
}

/// Counts and orders the pending connections.
pub(crate) struct Admission {
    limit: usize,
    per_addr: usize,
    // A std mutex: a few map operations, never held across `.await`.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Admission order of the next connection.
    next: u64,
    /// Pending connections that have sent nothing, oldest first.
    silent: BTreeMap<u64, Entry>,
    /// Pending connections that have sent something, oldest first.
    talking: BTreeMap<u64, Entry>,
    /// Pending connections per source address (both maps).
    per_ip: HashMap<IpAddr, usize>,
    /// Connections shed as silent that had spoken by then and took a place again.
    readmitted: u64,
}

struct Entry {
    ip: IpAddr,
    shed: CancellationToken,
}

impl State {
    fn len(&self) -> usize {
        self.silent.len() + self.talking.len()
    }

    /// Removes connection `id` (wherever it is) and cancels nothing; returns it.
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self
            .silent
            .remove(&id)
            .or_else(|| self.talking.remove(&id))?;
        if let Some(n) = self.per_ip.get_mut(&entry.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&entry.ip);
            }
        }
        Some(entry)
    }

    /// Sheds connection `id`: it leaves the counts at once and its task is told to close.
    fn shed(&mut self, id: u64) -> Option<Shed> {
        let silent = self.silent.contains_key(&id);
        let entry = self.remove(id)?;
        entry.shed.cancel();
        Some(Shed {
            ip: entry.ip,
            silent,
        })
    }

    /// The oldest silent connection, from `ip` only if given.
    fn oldest_silent(&self, ip: Option<IpAddr>) -> Option<u64> {
        self.silent
            .iter()
            .find(|(_, e)| ip.is_none_or(|ip| e.ip == ip))
            .map(|(&id, _)| id)
    }
}

/// One pending connection's place; dropping it frees the place.
pub(crate) struct Pending {
    admission: Arc<Admission>,
    id: u64,
    shed: CancellationToken,
}

impl Admission {
    /// Admission with these caps (each at least 1).
    pub(crate) fn new(limit: usize, per_addr: usize) -> Arc<Admission> {
        Arc::new(Admission {
            limit: limit.max(1),
            per_addr: per_addr.max(1),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `ip`, shedding an older one if a cap is reached (see the
    /// module docs); says which one it shed, or why the newcomer is refused. `talking`: its
    /// first byte has arrived already.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        talking: bool,
    ) -> Result<(Pending, Option<Shed>), Refused> {
        let mut state = self.lock();
        let mut shed = None;
        if state.per_ip.get(&ip).copied().unwrap_or(0) >= self.per_addr {
            let Some(victim) = state.oldest_silent(Some(ip)) else {
                return Err(Refused::TooManyFromAddress {
                    limit: self.per_addr,
                });
            };
            shed = state.shed(victim);
        }
        if state.len() >= self.limit {
            let victim = state
                .oldest_silent(None)
                .or_else(|| state.talking.keys().next().copied());
            // Some: the maps hold `limit` ≥ 1 entries.
            if let Some(victim) = victim {
                shed = state.shed(victim);
            }
        }
        Ok((self.insert(&mut state, ip, talking), shed))
    }

    /// Gives a talking connection from `ip`, just shed as silent, a place again, if a silent
    /// connection can be shed for it (from `ip` at the per-address cap); else `None`, and it
    /// stays shed. A talking connection never takes the place of another talking one here.
    pub(crate) fn readmit(self: &Arc<Self>, ip: IpAddr) -> Option<(Pending, Option<Shed>)> {
        let mut state = self.lock();
        let at_addr_cap = state.per_ip.get(&ip).copied().unwrap_or(0) >= self.per_addr;
        let victim = if at_addr_cap {
            Some(state.oldest_silent(Some(ip))?)
        } else if state.len() >= self.limit {
            Some(state.oldest_silent(None)?)
        } else {
            None
        };
        let shed = victim.and_then(|victim| state.shed(victim));
        state.readmitted += 1;
        Some((self.insert(&mut state, ip, true), shed))
    }

    /// Adds a connection from `ip` (the caps are the caller's concern).
    fn insert(self: &Arc<Self>, state: &mut State, ip: IpAddr, talking: bool) -> Pending {
        let id = state.next;
        state.next += 1;
        let token = CancellationToken::new();
        let entry = Entry {
            ip,
            shed: token.clone(),
        };
        if talking {
            state.talking.insert(id, entry);
        } else {
            state.silent.insert(id, entry);
        }
        *state.per_ip.entry(ip).or_insert(0) += 1;
        Pending {
            admission: self.clone(),
            id,
            shed: token,
        }
    }

    /// Connections shed as silent that had spoken by then and took a place again.
    #[cfg(test)]
    pub(crate) fn readmitted(&self) -> u64 {
        self.lock().readmitted
    }

    /// Sheds the oldest silent connection, if any (the hub is out of file descriptors).
    pub(crate) fn shed_oldest_silent(&self) -> Option<Shed> {
        let mut state = self.lock();
        let victim = state.oldest_silent(None)?;
        state.shed(victim)
    }

    /// Pending connections right now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Pending {
    /// Notes that the connection sent its first byte: it is shed only after every silent one.
    pub(crate) fn heard(&self) {
        let mut state = self.admission.lock();
        if let Some(entry) = state.silent.remove(&self.id) {
            state.talking.insert(self.id, entry);
        }
    }

    /// Cancelled when the connection is shed to make room for a newer one.
    pub(crate) fn shed(&self) -> CancellationToken {
        self.shed.clone()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.admission.lock().remove(self.id);
    }
}

/// Lets through at most one log line per [`LogLimit::EVERY`] for a kind of event, and counts
/// the ones held back, so a flood of refusals cannot flood the log.
pub(crate) struct LogLimit {
    // A std mutex: two fields, never held across `.await`.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// The shortest time between two lines.
    pub(crate) const EVERY: Duration = Duration::from_secs(1);

    /// A limiter that lets the first line through.
    pub(crate) const fn new() -> LogLimit {
        LogLimit {
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last line)` if a line may be written now, else `None` (and
    /// this one is counted).
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < Self::EVERY => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn at_the_address_cap_the_oldest_silent_one_from_that_address_is_shed() {
        let adm = Admission::new(100, 2);
        let (a1, _) = adm.admit(ip(1), false).unwrap();
        let (a2, _) = adm.admit(ip(1), false).unwrap();
        let (_b1, _) = adm.admit(ip(2), false).unwrap();
        let (_a3, shed) = adm.admit(ip(1), false).unwrap();
        assert_eq!(
            shed,
            Some(Shed {
                ip: ip(1),
                silent: true
            })
        );
        assert!(a1.shed().is_cancelled() && !a2.shed().is_cancelled());
        assert_eq!(adm.len(), 3);
        // A shed place is not freed twice when its owner drops it.
        drop(a1);
        assert_eq!(adm.len(), 3);
    }

    #[test]
    fn an_address_whose_connections_all_talk_is_refused_a_further_one() {
        let adm = Admission::new(100, 2);
        let (a1, _) = adm.admit(ip(1), false).unwrap();
        let (a2, _) = adm.admit(ip(1), false).unwrap();
        a1.heard();
        a2.heard();
        assert_eq!(
            adm.admit(ip(1), false).err(),
            Some(Refused::TooManyFromAddress { limit: 2 })
        );
        // Other addresses are unaffected; a place freed is a place again.
        adm.admit(ip(2), false).unwrap();
        drop(a1);
        adm.admit(ip(1), false).unwrap();
    }

    #[test]
    fn at_the_overall_cap_silent_ones_go_first_then_the_oldest_talking_one() {
        let adm = Admission::new(3, 10);
        let (t1, _) = adm.admit(ip(1), false).unwrap();
        t1.heard();
        let (s2, _) = adm.admit(ip(2), false).unwrap();
        let (t3, _) = adm.admit(ip(3), false).unwrap();
        t3.heard();
        // Full: the silent one goes, although it is younger than t1.
        let (n4, shed) = adm.admit(ip(4), false).unwrap();
        assert_eq!(shed.map(|s| (s.ip, s.silent)), Some((ip(2), true)));
        assert!(s2.shed().is_cancelled());
        n4.heard();
        // Nobody silent left: the oldest talking one goes.
        let (_n5, shed) = adm.admit(ip(5), false).unwrap();
        assert_eq!(shed.map(|s| (s.ip, s.silent)), Some((ip(1), false)));
        assert!(t1.shed().is_cancelled() && !t3.shed().is_cancelled());
        assert_eq!(adm.len(), 3);
    }

    #[test]
    fn out_of_descriptors_sheds_only_silent_ones() {
        let adm = Admission::new(10, 10);
        let (t, _) = adm.admit(ip(1), false).unwrap();
        t.heard();
        assert_eq!(adm.shed_oldest_silent(), None);
        let (s, _) = adm.admit(ip(2), false).unwrap();
        assert_eq!(adm.shed_oldest_silent().map(|s| s.ip), Some(ip(2)));
        assert!(s.shed().is_cancelled() && !t.shed().is_cancelled());
    }

    #[test]
    fn a_connection_that_spoke_before_it_was_accepted_is_shed_only_after_the_silent_ones() {
        let adm = Admission::new(2, 10);
        let (t1, _) = adm.admit(ip(1), true).unwrap();
        let (s2, _) = adm.admit(ip(2), false).unwrap();
        let (_n3, shed) = adm.admit(ip(3), false).unwrap();
        assert_eq!(shed.map(|s| (s.ip, s.silent)), Some((ip(2), true)));
        assert!(s2.shed().is_cancelled() && !t1.shed().is_cancelled());
    }

    #[test]
    fn a_connection_shed_as_silent_that_has_spoken_takes_a_silent_ones_place() {
        let adm = Admission::new(2, 10);
        let (s1, _) = adm.admit(ip(1), false).unwrap();
        let (s2, _) = adm.admit(ip(2), false).unwrap();
        // s1 spoke, but its task had not seen it yet when the newcomer came.
        let (n3, shed) = adm.admit(ip(3), false).unwrap();
        assert_eq!(shed.map(|s| s.ip), Some(ip(1)));
        assert!(s1.shed().is_cancelled());
        let (r1, shed) = adm.readmit(ip(1)).expect("a silent one to shed");
        assert_eq!(shed.map(|s| (s.ip, s.silent)), Some((ip(2), true)));
        assert!(s2.shed().is_cancelled() && !n3.shed().is_cancelled());
        assert_eq!((adm.len(), adm.readmitted()), (2, 1));
        // It is talking now: the next newcomer sheds the silent n3, not it.
        let (_n4, shed) = adm.admit(ip(4), false).unwrap();
        assert_eq!(shed.map(|s| s.ip), Some(ip(3)));
        assert!(!r1.shed().is_cancelled());
        drop((s1, s2));
        assert_eq!(adm.len(), 2);
    }

    #[test]
    fn a_readmission_never_takes_a_talking_connections_place() {
        // Overall cap, nobody silent.
        let adm = Admission::new(1, 10);
        let (t1, _) = adm.admit(ip(1), true).unwrap();
        assert!(adm.readmit(ip(2)).is_none());
        assert!(!t1.shed().is_cancelled());
        // Per-address cap: only a silent one from that address may go.
        let adm = Admission::new(10, 1);
        let (t1, _) = adm.admit(ip(1), true).unwrap();
        let (s2, _) = adm.admit(ip(2), false).unwrap();
        assert!(adm.readmit(ip(1)).is_none());
        assert!(!t1.shed().is_cancelled() && !s2.shed().is_cancelled());
        // Room left: no one is shed.
        let (_r3, shed) = adm.readmit(ip(3)).unwrap();
        assert_eq!((shed, adm.len()), (None, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_limit_lets_one_line_a_second_through_and_counts_the_rest() {
        let limit = LogLimit::new();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        tokio::time::advance(LogLimit::EVERY).await;
        assert_eq!(limit.allow(), Some(2));
        assert_eq!(limit.allow(), None);
    }
}
