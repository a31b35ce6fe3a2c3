//! Admission: the connections the hub holds before they have published.
//!
//! A connection is *pending* from accept until it publishes. Pending connections are capped
//! overall ([`HubOptions::max_pending`](super::HubOptions::max_pending)) and per source address
//! ([`HubOptions::max_pending_per_addr`](super::HubOptions::max_pending_per_addr)). A pending
//! connection is *silent* until its first byte arrives, then *talking* (TLS, hello, publish).
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
    /// module docs); says which one it shed, or why the newcomer is refused.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<(Pending, Option<Shed>), Refused> {
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
        let id = state.next;
        state.next += 1;
        let token = CancellationToken::new();
        state.silent.insert(
            id,
            Entry {
                ip,
                shed: token.clone(),
            },
        );
        *state.per_ip.entry(ip).or_insert(0) += 1;
        let pending = Pending {
            admission: self.clone(),
            id,
            shed: token,
        };
        Ok((pending, shed))
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
        let (a1, _) = adm.admit(ip(1)).unwrap();
        let (a2, _) = adm.admit(ip(1)).unwrap();
        let (_b1, _) = adm.admit(ip(2)).unwrap();
        let (_a3, shed) = adm.admit(ip(1)).unwrap();
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
        let (a1, _) = adm.admit(ip(1)).unwrap();
        let (a2, _) = adm.admit(ip(1)).unwrap();
        a1.heard();
        a2.heard();
        assert_eq!(
            adm.admit(ip(1)).err(),
            Some(Refused::TooManyFromAddress { limit: 2 })
        );
        // Other addresses are unaffected; a place freed is a place again.
        adm.admit(ip(2)).unwrap();
        drop(a1);
        adm.admit(ip(1)).unwrap();
    }

    #[test]
    fn at_the_overall_cap_silent_ones_go_first_then_the_oldest_talking_one() {
        let adm = Admission::new(3, 10);
        let (t1, _) = adm.admit(ip(1)).unwrap();
        t1.heard();
        let (s2, _) = adm.admit(ip(2)).unwrap();
        let (t3, _) = adm.admit(ip(3)).unwrap();
        t3.heard();
        // Full: the silent one goes, although it is younger than t1.
        let (n4, shed) = adm.admit(ip(4)).unwrap();
        assert_eq!(shed.map(|s| (s.ip, s.silent)), Some((ip(2), true)));
        assert!(s2.shed().is_cancelled());
        n4.heard();
        // Nobody silent left: the oldest talking one goes.
        let (_n5, shed) = adm.admit(ip(5)).unwrap();
        assert_eq!(shed.map(|s| (s.ip, s.silent)), Some((ip(1), false)));
        assert!(t1.shed().is_cancelled() && !t3.shed().is_cancelled());
        assert_eq!(adm.len(), 3);
    }

    #[test]
    fn out_of_descriptors_sheds_only_silent_ones() {
        let adm = Admission::new(10, 10);
        let (t, _) = adm.admit(ip(1)).unwrap();
        t.heard();
        assert_eq!(adm.shed_oldest_silent(), None);
        let (s, _) = adm.admit(ip(2)).unwrap();
        assert_eq!(adm.shed_oldest_silent().map(|s| s.ip), Some(ip(2)));
        assert!(s.shed().is_cancelled() && !t.shed().is_cancelled());
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
