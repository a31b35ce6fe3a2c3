//! The fleet's directory on etcd.
//!
//! # Who drives what
//!
//! [`Etcd::start`] spawns one driver task, owned by the [`Etcd`] value (dropping it aborts
//! the task; [`Directory::close`] stops it and revokes the lease). The driver runs sessions
//! one after the other; each session:
//!
//! 1. keeps this hub's lease (the one it had if etcd still knows it, else a new grant);
//! 2. writes this hub's record `hubs/ID` under the lease (refusing an id that another live
//!    hub process uses);
//! 3. reads every key under the prefix at one revision and replaces the watched copy with
//!    it;
//! 4. re-claims under the current lease every name this hub still holds (a name another hub
//!    claimed meanwhile is [`Event::Lost`]), and deletes its own keys for names it no longer
//!    holds (orphans of a publish whose answer was lost, or of a release while etcd was out
//!    of reach);
//! 5. then watches the prefix from the revision after the read, and renews the lease every
//!    `keepalive_every`, until anything fails: a failed or late call, a lost lease, a watch
//!    that ends. The driver then waits (100 ms, doubling to 2 s) and starts a new session.
//!
//! A session talks to one etcd member (endpoint); after a failed session the next one
//! tries the next endpoint, so a dead member is left within one renewal period and a call
//! timeout. (One client per endpoint, rather than one client balancing over all of them:
//! a balancing client keeps sending some calls to a dead member.)
//!
//! Publishes and releases are made by the callers' tasks, directly against etcd through
//! the session's member, each call bounded by `call_timeout`. A publish is refused at once,
//! with "the fleet's directory is unreachable", while no session is up; a call that fails
//! makes the session renew the lease at once, so a dead member is noticed without waiting
//! for the next renewal.
//!
//! # What "holds" means here
//!
//! A claim is proven while its lease is known to be alive: until the lease's TTL has passed
//! since the last renewal was sent (etcd restarts the TTL when it receives the renewal,
//! later than that). After that, with etcd out of reach, another hub may have claimed the
//! name once the lease expired, so [`Directory::holds`] is false until a session has
//! renewed or re-claimed it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use futures::future::BoxFuture;
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::copy::{Copy, Kv};
use super::record::{HubValue, Instance, Layout, PeerValue};
use super::{
    Directory, DirectoryError, Event, Holder, HubId, HubInfo, Unreachable, EVENTS_CAPACITY,
};

/// How a hub joins a fleet's directory on etcd.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub(crate) struct EtcdConfig {
    /// etcd client URLs (`http://host:port`). Required.
    pub(crate) endpoints: Vec<String>,
    /// The prefix of every key. Default `/netchan/fileshare`.
    pub(crate) prefix: String,
    /// This hub's id, unique among the live hubs of the fleet. Required.
    pub(crate) hub_id: HubId,
    /// This hub's hub-to-hub address, written in its records. Default empty.
    pub(crate) hub_addr: String,
    /// The lease's time to live: a hub that stops renewing (it died, or lost etcd) frees its
    /// names this long after its last renewal. Whole seconds, at least 1. Default 10 s.
    pub(crate) lease_ttl: Duration,
    /// How often the lease is renewed. Default 3 s.
    pub(crate) keepalive_every: Duration,
    /// The bound on every etcd call (and on connecting). Default 3 s.
    pub(crate) call_timeout: Duration,
    /// The first wait before a new session after a failed one (doubling up to
    /// `retry_max`). Default 100 ms.
    pub(crate) retry_min: Duration,
    /// The longest wait between sessions. Default 2 s.
    pub(crate) retry_max: Duration,
}

impl EtcdConfig {
    /// The defaults, for the hub `hub_id` on the etcd cluster at `endpoints`.
    pub(crate) fn new(endpoints: Vec<String>, hub_id: HubId) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: String::from("/netchan/fileshare"),
            hub_id,
            hub_addr: String::new(),
            lease_ttl: Duration::from_secs(10),
            keepalive_every: Duration::from_secs(3),
            call_timeout: Duration::from_secs(3),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
        }
    }
}

/// The directory of a hub in a fleet on etcd. See the module docs for how it works.
pub(crate) struct Etcd {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    config: EtcdConfig,
    layout: Layout,
    instance: Instance,
    /// One client per endpoint, in the configured order.
    clients: Vec<Client>,
    /// The endpoint the current session uses.
    current: AtomicUsize,
    /// A caller's etcd call failed: the session checks its member at once.
    suspect: Notify,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// Whether a session is up (publishes are accepted), or why not.
    phase: watch::Sender<Phase>,
}

/// Where the driver is, as waiters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No session has been up or failed yet.
    Starting,
    /// A session is up.
    Up,
    /// The last session failed (or the directory closed), for this reason.
    Down(Down),
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    /// Until when the lease is known to be alive.
    proven_until: Instant,
}

/// A name this hub holds.
#[derive(Debug, Clone, Copy)]
struct Claim {
    /// The lease the key was last written under.
    lease: i64,
    /// The key's create revision, for a delete that removes this claim's key only.
    create_revision: i64,
}

/// Why the last session is down, for publishes refused meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    NoLease,
    HubIdInUse,
}

struct State {
    lease: Option<Lease>,
    up: bool,
    down: Down,
    held: HashMap<String, Claim>,
    /// Names whose publish is in flight (claimed or not yet).
    pending: HashSet<String>,
    copy: Copy,
    /// A key of this hub's may be left without a claim: the next renewal sweeps.
    sweep: bool,
    closed: bool,
}

impl State {
    fn lease_alive(&self, now: Instant) -> Option<Lease> {
        self.lease.filter(|l| l.proven_until > now)
    }
}

/// How a session ended.
#[derive(Debug)]
enum Ended {
    Stopped,
    Failed(Unreachable),
    LeaseLost,
    ClaimDeleted(String),
    StreamClosed(String),
}

/// The outcome of one claim transaction sequence.
enum Claimed {
    Yes { create_revision: i64 },
    Taken,
}

/// Claim attempts when a key is contended (our own orphan changing under us).
const CLAIM_ATTEMPTS: usize = 3;

impl Etcd {
    /// Joins the fleet: checks the configuration, starts the driver and returns at once
    /// (etcd may be unreachable: the driver keeps trying, and publishes are refused until
    /// it succeeds; [`Etcd::wait_up`] waits for that).
    pub(crate) async fn start(config: EtcdConfig) -> Result<Etcd, DirectoryError> {
        if config.endpoints.is_empty() {
            return Err(DirectoryError::Config {
                what: "no etcd endpoint".into(),
            });
        }
        if config.lease_ttl < Duration::from_secs(1) {
            return Err(DirectoryError::Config {
                what: format!("lease TTL {:?} is under 1 s", config.lease_ttl),
            });
        }
        if config.keepalive_every.is_zero() || config.keepalive_every >= config.lease_ttl {
            return Err(DirectoryError::Config {
                what: format!(
                    "renewing every {:?} cannot keep a lease of {:?} alive",
                    config.keepalive_every, config.lease_ttl
                ),
            });
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(config.call_timeout)
            // A member cut off from the others answers "no leader" instead of stale data,
            // and its watches end instead of going quiet.
            .with_require_leader(true);
        let mut clients = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            // Connecting is lazy (no round trip): an unreachable endpoint fails its first
            // call, not this.
            let client = tokio::time::timeout(
                config.call_timeout,
                Client::connect([endpoint], Some(options.clone())),
            )
            .await
            .map_err(|_| DirectoryError::Config {
                what: format!("setting up the etcd client of {endpoint} took too long"),
            })?
            .map_err(|e| DirectoryError::Config {
                what: format!("etcd endpoint {endpoint:?}: {e}"),
            })?;
            clients.push(client);
        }
        let layout = Layout::new(&config.prefix);
        let shared = Arc::new(Shared {
            layout: layout.clone(),
            instance: rand::random(),
            clients,
            current: AtomicUsize::new(0),
            suspect: Notify::new(),
            state: Mutex::new(State {
                lease: None,
                up: false,
                down: Down::NoLease,
                held: HashMap::new(),
                pending: HashSet::new(),
                copy: Copy::new(layout),
                sweep: false,
                closed: false,
            }),
            events: broadcast::channel(EVENTS_CAPACITY).0,
            phase: watch::channel(Phase::Starting).0,
            config,
        });
        let (stop, stop_rx) = watch::channel(false);
        let driver = tokio::spawn(drive(shared.clone(), stop_rx));
        Ok(Etcd {
            shared,
            stop,
            driver: Mutex::new(Some(driver)),
        })
    }

    /// Whether the last session failed because another live hub process uses this hub's id
    /// (a configuration mistake that retrying does not fix while that hub lives).
    pub(crate) fn id_in_use(&self) -> bool {
        matches!(self.shared.lock().down, Down::HubIdInUse)
    }

    /// Waits until a session is up (the lease held, the copy read, the watch on). Cancel-safe.
    pub(crate) async fn wait_up(&self) {
        let mut phase = self.shared.phase.subscribe();
        // Err only if the sender is gone, which `self` prevents.
        let _ = phase.wait_for(|p| *p == Phase::Up).await;
    }

    /// Waits until a session has failed because this hub's id is in use. Cancel-safe.
    #[cfg(test)]
    pub(crate) async fn wait_id_in_use(&self) {
        let mut phase = self.shared.phase.subscribe();
        let _ = phase
            .wait_for(|p| *p == Phase::Down(Down::HubIdInUse))
            .await;
    }
}

impl Drop for Etcd {
    /// Stops the driver without revoking the lease, as a crash would: this hub's names
    /// expire with the lease. [`Directory::close`] is the clean way out.
    fn drop(&mut self) {
        if let Some(driver) = self.driver.get_mut().ok().and_then(Option::take) {
            driver.abort();
        }
    }
}

impl Directory for Etcd {
    fn hub_id(&self) -> &HubId {
        &self.shared.config.hub_id
    }

    fn publish<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DirectoryError>> {
        Box::pin(self.shared.publish(name))
    }

    fn release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DirectoryError>> {
        Box::pin(self.shared.release(name))
    }

    fn holds(&self, name: &str) -> bool {
        let state = self.shared.lock();
        holds(&state, name, Instant::now())
    }

    fn lookup(&self, name: &str) -> Option<Holder> {
        let state = self.shared.lock();
        if holds(&state, name, Instant::now()) {
            return Some(Holder {
                hub: self.shared.config.hub_id.clone(),
                addr: self.shared.config.hub_addr.clone(),
                here: true,
            });
        }
        let entry = state.copy.peer(name)?;
        // A key of this process that it cannot prove it holds is nobody's for now.
        if entry.value.instance == self.shared.instance {
            return None;
        }
        Some(Holder {
            hub: entry.value.hub.clone(),
            addr: entry.value.addr.clone(),
            here: false,
        })
    }

    /// The watched copy's names, and this hub's own claims at once: a name this hub has just
    /// claimed is listed here before its watch event comes back.
    fn names(&self) -> Vec<String> {
        let state = self.shared.lock();
        let now = Instant::now();
        let mut names = state.copy.names();
        names.extend(
            state
                .held
                .keys()
                .filter(|name| holds(&state, name, now))
                .cloned(),
        );
        names.sort_unstable();
        names.dedup();
        names
    }

    fn hubs(&self) -> Vec<HubInfo> {
        self.shared.lock().copy.hubs()
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let lease = {
                let mut state = self.shared.lock();
                state.closed = true;
                state.up = false;
                state.held.clear();
                state.lease.take()
            };
            self.shared.phase.send_replace(Phase::Down(Down::NoLease));
            let _ = self.stop.send(true);
            let driver = self
                .driver
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(driver) = driver {
                // The driver answers the stop at its next await; bounded all the same.
                if tokio::time::timeout(self.shared.config.call_timeout, driver)
                    .await
                    .is_err()
                {
                    warn!("the fleet directory's driver did not stop in time");
                }
            }
            if let Some(lease) = lease {
                let mut lc = self.shared.client().lease_client();
                match self.shared.call(lc.revoke(lease.id)).await {
                    Ok(_) => info!(hub = %self.shared.config.hub_id, "left the fleet"),
                    Err(e) => warn!(
                        error = %e,
                        "could not revoke the lease: this hub's names expire with it"
                    ),
                }
            }
        })
    }
}

fn holds(state: &State, name: &str, now: Instant) -> bool {
    match (state.held.get(name), state.lease_alive(now)) {
        (Some(claim), Some(lease)) => claim.lease == lease.id,
        _ => false,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section is left half-done by a panic that matters: each is a few map
        // updates, so a poisoned lock still holds usable state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The client of the current session's member.
    fn client(&self) -> &Client {
        &self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()]
    }

    /// Moves the next session to the next endpoint.
    fn rotate(&self) {
        if self.clients.len() > 1 {
            let next = (self.current.load(Ordering::Relaxed) + 1) % self.clients.len();
            self.current.store(next, Ordering::Relaxed);
            debug!(endpoint = %self.config.endpoints[next], "trying the next etcd endpoint");
        }
    }

    /// Runs an etcd call under the call timeout.
    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Unreachable> {
        match tokio::time::timeout(self.config.call_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Unreachable::Etcd(e)),
            Err(_) => Err(Unreachable::TimedOut(self.config.call_timeout)),
        }
    }

    fn peer_value(&self) -> Vec<u8> {
        PeerValue {
            hub: self.config.hub_id.clone(),
            addr: self.config.hub_addr.clone(),
            instance: self.instance,
        }
        .encode()
    }

    fn send(&self, events: Vec<Event>) {
        for e in events {
            // No subscriber is fine.
            let _ = self.events.send(e);
        }
    }

    async fn publish(&self, name: &str) -> Result<(), DirectoryError> {
        let lease = {
            let mut state = self.lock();
            if state.closed {
                return Err(DirectoryError::Closed);
            }
            if state.held.contains_key(name) || state.pending.contains(name) {
                return Err(DirectoryError::Taken {
                    name: name.to_owned(),
                });
            }
            let lease = match (state.up, state.lease_alive(Instant::now())) {
                (true, Some(lease)) => lease,
                _ => {
                    return Err(match state.down {
                        Down::HubIdInUse => {
                            Unreachable::HubIdInUse(self.config.hub_id.clone()).into()
                        }
                        Down::NoLease => Unreachable::NoLease.into(),
                    })
                }
            };
            state.pending.insert(name.to_owned());
            lease
        };
        let result = self.claim(name, lease.id).await;
        let mut state = self.lock();
        state.pending.remove(name);
        match result {
            Ok(Claimed::Yes { create_revision }) => {
                let current = state.lease.map(|l| l.id);
                if current == Some(lease.id) && !state.closed {
                    state.held.insert(
                        name.to_owned(),
                        Claim {
                            lease: lease.id,
                            create_revision,
                        },
                    );
                    debug!(peer = name, "claimed in the fleet's directory");
                    Ok(())
                } else {
                    // The lease changed (or the directory closed) during the call: the
                    // key went, or goes, with the old lease.
                    state.sweep = true;
                    Err(if state.closed {
                        DirectoryError::Closed
                    } else {
                        Unreachable::NoLease.into()
                    })
                }
            }
            Ok(Claimed::Taken) => Err(DirectoryError::Taken {
                name: name.to_owned(),
            }),
            Err(cause) => {
                // The claim may have been made with its answer lost: the next sweep
                // deletes the key if nobody here holds the name by then.
                state.sweep = true;
                self.suspect.notify_one();
                Err(cause.into())
            }
        }
    }

    /// Creates `peers/NAME` under `lease` if it is absent; adopts it if it is an orphan of
    /// this process (a claim whose answer was lost).
    async fn claim(&self, name: &str, lease: i64) -> Result<Claimed, Unreachable> {
        let key = self.layout.peer(name);
        let value = self.peer_value();
        let put = || {
            TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        for _ in 0..CLAIM_ATTEMPTS {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()])
                .or_else([TxnOp::get(key.clone(), None)]);
            let mut kv = self.shared_kv();
            let resp = self.call(kv.txn(txn)).await?;
            if resp.succeeded() {
                let create_revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                return Ok(Claimed::Yes { create_revision });
            }
            let existing = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            let Some(existing) = existing else {
                // Deleted between the compare and the read: try again.
                continue;
            };
            let ours = PeerValue::decode(existing.value())
                .map(|v| v.instance == self.instance)
                .unwrap_or(false);
            if !ours {
                return Ok(Claimed::Taken);
            }
            // Our own orphan: take it over under the current lease, unless it changed
            // since the read (a sweep deleting it, say).
            let adopt = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    existing.mod_revision(),
                )])
                .and_then([put()]);
            let mut kv = self.shared_kv();
            if self.call(kv.txn(adopt)).await?.succeeded() {
                return Ok(Claimed::Yes {
                    create_revision: existing.create_revision(),
                });
            }
        }
        // Contended every time: someone else keeps changing the key.
        Ok(Claimed::Taken)
    }

    fn shared_kv(&self) -> etcd_client::KvClient {
        self.client().kv_client()
    }

    async fn release(&self, name: &str) -> Result<(), DirectoryError> {
        let claim = {
            let mut state = self.lock();
            match state.held.remove(name) {
                Some(claim) => claim,
                None => return Ok(()),
            }
        };
        let key = self.layout.peer(name);
        // Only this claim's key: never a key that another hub created after ours expired.
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                claim.create_revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut kv = self.shared_kv();
        match self.call(kv.txn(txn)).await {
            Ok(_) => {
                debug!(peer = name, "released in the fleet's directory");
                Ok(())
            }
            Err(cause) => {
                self.lock().sweep = true;
                self.suspect.notify_one();
                Err(cause.into())
            }
        }
    }

    /// Deletes this process's keys for names it neither holds nor is publishing.
    async fn sweep(&self) -> Result<(), Unreachable> {
        let orphans: Vec<(String, i64)> = {
            let mut state = self.lock();
            state.sweep = false;
            let state = &*state;
            state
                .copy
                .peers_of(self.instance)
                .filter(|(name, _)| {
                    !state.held.contains_key(*name) && !state.pending.contains(*name)
                })
                .map(|(name, e)| (name.to_owned(), e.mod_revision))
                .collect()
        };
        for (name, mod_revision) in orphans {
            let key = self.layout.peer(&name);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::delete(key, None)]);
            let mut kv = self.shared_kv();
            if let Err(e) = self.call(kv.txn(txn)).await {
                self.lock().sweep = true;
                return Err(e);
            }
            debug!(peer = %name, "deleted an orphan key of this hub");
        }
        Ok(())
    }

    fn set_up(&self, up: bool, down: Down) {
        {
            let mut state = self.lock();
            state.up = up;
            state.down = down;
        }
        self.phase
            .send_replace(if up { Phase::Up } else { Phase::Down(down) });
    }
}

/// The driver: sessions one after the other until stopped.
async fn drive(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut wait = shared.config.retry_min;
    // Whether the last session failure was already reported (one warning per outage).
    let mut reported = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let mut was_up = false;
        let ended = session(&shared, &mut stop, &mut was_up).await;
        let down = match &ended {
            Ended::Failed(Unreachable::HubIdInUse(_)) => Down::HubIdInUse,
            _ => Down::NoLease,
        };
        shared.set_up(false, down);
        if matches!(ended, Ended::Failed(_)) {
            shared.rotate();
        }
        match ended {
            Ended::Stopped => return,
            Ended::Failed(e) => {
                if was_up || !reported {
                    warn!(
                        hub = %shared.config.hub_id,
                        error = %DisplayChain(&e),
                        "the fleet's directory is unreachable; retrying"
                    );
                    reported = true;
                } else {
                    debug!(error = %DisplayChain(&e), "the fleet's directory is still unreachable");
                }
            }
            Ended::LeaseLost => {
                warn!(hub = %shared.config.hub_id, "this hub's lease expired; re-claiming its names");
                reported = true;
            }
            Ended::ClaimDeleted(name) => {
                warn!(peer = %name, "a key this hub holds was deleted; re-claiming");
            }
            Ended::StreamClosed(why) => {
                debug!(why = %why, "the directory watch ended; reading again");
            }
        }
        if was_up {
            wait = shared.config.retry_min;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        wait = (wait * 2).min(shared.config.retry_max);
    }
}

/// Formats an error with its sources, `a: b: c`.
struct DisplayChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// One session: see the module docs. `was_up` is set once the session accepted publishes.
async fn session(shared: &Shared, stop: &mut watch::Receiver<bool>, was_up: &mut bool) -> Ended {
    let run = async {
        let (mut keeper, mut renewals) = match keep_lease(shared).await {
            Ok(k) => k,
            Err(e) => return Ended::Failed(e),
        };
        if let Err(e) = register_hub(shared, keeper.id()).await {
            return Ended::Failed(e);
        }
        let revision = match read_all(shared).await {
            Ok(r) => r,
            Err(e) => return Ended::Failed(e),
        };
        if let Err(e) = reclaim(shared, keeper.id()).await {
            return Ended::Failed(e);
        }
        if let Err(e) = shared.sweep().await {
            return Ended::Failed(e);
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut wc = shared.client().watch_client();
        let mut watch = match shared
            .call(wc.watch(shared.layout.root(), Some(options)))
            .await
        {
            Ok(w) => w,
            Err(e) => return Ended::Failed(e),
        };
        let held = shared.lock().held.len();
        shared.set_up(true, Down::NoLease);
        *was_up = true;
        info!(
            hub = %shared.config.hub_id,
            names = held,
            revision,
            "the fleet's directory is reachable"
        );
        serve(shared, &mut keeper, &mut renewals, &mut watch).await
    };
    tokio::select! {
        ended = run => ended,
        _ = stop.changed() => Ended::Stopped,
    }
}

/// The lease to use: the current one if etcd still knows it, else a new one. Returns its
/// renewal stream, with the lease's proof updated.
async fn keep_lease(shared: &Shared) -> Result<(LeaseKeeper, LeaseKeepAliveStream), Unreachable> {
    let ttl = shared.config.lease_ttl.as_secs().max(1) as i64;
    let current = shared.lock().lease.map(|l| l.id);
    let mut lc = shared.client().lease_client();
    if let Some(id) = current {
        let sent = Instant::now();
        match shared.call(lc.keep_alive(id)).await {
            Ok(pair) => {
                // keep_alive() read the first renewal, with a positive TTL.
                prove(shared, id, sent, shared.config.lease_ttl);
                return Ok(pair);
            }
            // etcd answered that the lease is gone: a new one below.
            Err(Unreachable::Etcd(etcd_client::Error::LeaseKeepAliveError(_))) => {
                info!(hub = %shared.config.hub_id, "this hub's lease expired; taking a new one");
            }
            Err(e) => return Err(e),
        }
    }
    let sent = Instant::now();
    let granted = shared.call(lc.grant(ttl, None)).await?;
    let id = granted.id();
    let pair = shared.call(lc.keep_alive(id)).await?;
    {
        let mut state = shared.lock();
        state.lease = Some(Lease {
            id,
            proven_until: sent,
        });
    }
    prove(
        shared,
        id,
        sent,
        Duration::from_secs(granted.ttl().max(0) as u64),
    );
    Ok(pair)
}

/// Records that lease `id` was alive with `ttl` to go as of a request sent at `sent`.
fn prove(shared: &Shared, id: i64, sent: Instant, ttl: Duration) {
    let mut state = shared.lock();
    if let Some(lease) = state.lease.as_mut().filter(|l| l.id == id) {
        lease.proven_until = lease.proven_until.max(sent + ttl);
    }
}

/// Writes `hubs/ID` under the lease, unless another live process uses this hub's id.
async fn register_hub(shared: &Shared, lease: i64) -> Result<(), Unreachable> {
    let key = shared.layout.hub(&shared.config.hub_id);
    let value = HubValue {
        addr: shared.config.hub_addr.clone(),
        instance: shared.instance,
    }
    .encode();
    let put = TxnOp::put(
        key.clone(),
        value,
        Some(PutOptions::new().with_lease(lease)),
    );
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([put.clone()])
        .or_else([TxnOp::get(key.clone(), None)]);
    let mut kv = shared.shared_kv();
    let resp = shared.call(kv.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(());
    }
    let existing = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    });
    let Some(existing) = existing else {
        return Err(Unreachable::NoLease);
    };
    let ours = HubValue::decode(existing.value())
        .map(|v| v.instance == shared.instance)
        .unwrap_or(false);
    if !ours {
        return Err(Unreachable::HubIdInUse(shared.config.hub_id.clone()));
    }
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key,
            CompareOp::Equal,
            existing.mod_revision(),
        )])
        .and_then([put]);
    let mut kv = shared.shared_kv();
    if shared.call(kv.txn(txn)).await?.succeeded() {
        Ok(())
    } else {
        Err(Unreachable::NoLease)
    }
}

/// Reads every key under the prefix and replaces the copy; returns the read's revision.
async fn read_all(shared: &Shared) -> Result<i64, Unreachable> {
    let mut kv = shared.shared_kv();
    let resp = shared
        .call(kv.get(shared.layout.root(), Some(GetOptions::new().with_prefix())))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let kvs = resp.kvs().iter().map(to_kv).collect::<Vec<_>>();
    let mut state = shared.lock();
    let events = state.copy.reset(kvs, revision);
    shared.send(events);
    Ok(revision)
}

fn to_kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// Makes every name this hub holds a key under `lease` again (after a new lease, or a key
/// that went missing); a name another hub took meanwhile is lost.
async fn reclaim(shared: &Shared, lease: i64) -> Result<(), Unreachable> {
    enum Todo {
        Keep(i64),
        Adopt,
        Create,
        Lost,
    }
    let todo: Vec<(String, Todo)> = {
        let state = shared.lock();
        state
            .held
            .keys()
            .map(|name| {
                let t = match state.copy.peer(name) {
                    Some(e) if e.value.instance == shared.instance && e.lease == lease => {
                        Todo::Keep(e.create_revision)
                    }
                    Some(e) if e.value.instance == shared.instance => Todo::Adopt,
                    Some(_) => Todo::Lost,
                    None => Todo::Create,
                };
                (name.clone(), t)
            })
            .collect()
    };
    let mut reclaimed = 0usize;
    for (name, todo) in todo {
        let outcome = match todo {
            Todo::Keep(create_revision) => Claimed::Yes { create_revision },
            Todo::Lost => Claimed::Taken,
            Todo::Adopt | Todo::Create => {
                reclaimed += 1;
                shared.claim(&name, lease).await?
            }
        };
        let mut state = shared.lock();
        let still_held = state.held.contains_key(&name);
        match outcome {
            Claimed::Yes { create_revision } if still_held => {
                state.held.insert(
                    name,
                    Claim {
                        lease,
                        create_revision,
                    },
                );
            }
            // Released while we re-claimed it: the key is an orphan now.
            Claimed::Yes { .. } => state.sweep = true,
            Claimed::Taken => {
                if still_held {
                    state.held.remove(&name);
                    warn!(peer = %name, "another hub claimed this name while this hub's lease was gone");
                    shared.send(vec![Event::Lost { name }]);
                }
            }
        }
    }
    if reclaimed > 0 {
        info!(
            names = reclaimed,
            "re-claimed names in the fleet's directory"
        );
    }
    Ok(())
}

/// The steady state of a session: renewals and watch events until something fails.
async fn serve(
    shared: &Shared,
    keeper: &mut LeaseKeeper,
    renewals: &mut LeaseKeepAliveStream,
    watch: &mut WatchStream,
) -> Ended {
    let mut tick = tokio::time::interval(shared.config.keepalive_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the lease was just renewed.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(ended) = renew(shared, keeper, renewals).await {
                    return ended;
                }
            }
            () = shared.suspect.notified() => {
                if let Some(ended) = renew(shared, keeper, renewals).await {
                    return ended;
                }
                tick.reset();
            }
            message = watch.message() => {
                let resp = match message {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return Ended::StreamClosed("the watch stream ended".into()),
                    Err(e) => return Ended::Failed(Unreachable::Etcd(e)),
                };
                if resp.canceled() {
                    return Ended::StreamClosed(format!(
                        "the watch was cancelled ({}; compacted at {})",
                        resp.cancel_reason(),
                        resp.compact_revision()
                    ));
                }
                if let Some(ended) = apply(shared, &resp) {
                    return ended;
                }
            }
        }
    }
}

/// Renews the lease once (and sweeps orphans if some may exist). `Some` ends the session.
async fn renew(
    shared: &Shared,
    keeper: &mut LeaseKeeper,
    renewals: &mut LeaseKeepAliveStream,
) -> Option<Ended> {
    let sent = Instant::now();
    let renewal = shared
        .call(async {
            keeper.keep_alive().await?;
            renewals.message().await
        })
        .await;
    match renewal {
        Ok(Some(r)) if r.ttl() > 0 => {
            prove(
                shared,
                keeper.id(),
                sent,
                Duration::from_secs(r.ttl() as u64),
            );
        }
        Ok(Some(_)) => {
            shared.lock().lease = None;
            return Some(Ended::LeaseLost);
        }
        Ok(None) => return Some(Ended::StreamClosed("the lease renewal stream ended".into())),
        Err(e) => return Some(Ended::Failed(e)),
    }
    if shared.lock().sweep {
        if let Err(e) = shared.sweep().await {
            return Some(Ended::Failed(e));
        }
    }
    None
}

/// Applies one watch answer to the copy. Ends the session if a key this hub holds was
/// deleted (its claim must be made again).
fn apply(shared: &Shared, resp: &etcd_client::WatchResponse) -> Option<Ended> {
    let mut state = shared.lock();
    let mut ended = None;
    for event in resp.events() {
        let Some(kv) = event.kv() else { continue };
        let events = match event.event_type() {
            EventType::Put => {
                let kv = to_kv(kv);
                if let Some(super::record::Key::Peer(name)) = shared.layout.parse(&kv.key) {
                    let ours = PeerValue::decode(&kv.value)
                        .map(|v| v.instance == shared.instance)
                        .unwrap_or(false);
                    if ours && !state.held.contains_key(&name) && !state.pending.contains(&name) {
                        state.sweep = true;
                    }
                }
                state.copy.put(&kv)
            }
            EventType::Delete => {
                if let Some(super::record::Key::Peer(name)) = shared.layout.parse(kv.key()) {
                    let was_ours = state
                        .copy
                        .peer(&name)
                        .is_some_and(|e| e.value.instance == shared.instance);
                    if was_ours
                        && state.held.contains_key(&name)
                        && kv.mod_revision() >= state.copy.revision()
                    {
                        ended = Some(Ended::ClaimDeleted(name));
                    }
                }
                state.copy.delete(kv.key(), kv.mod_revision())
            }
        };
        shared.send(events);
    }
    ended
}
