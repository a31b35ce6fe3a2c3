//! The fleet's directory: which hub holds which peer name, with the rule that a name has
//! exactly one live holder in the whole fleet.
//!
//! One job: publish (claim a name for this hub), release, look up, watch. The hub talks to
//! it through the [`Directory`] trait, so a single hub and a fleet run the same code path:
//!
//! - [`InProcess`]: one hub on its own (the default). Names live in this process only;
//!   no extra process, exactly the single hub's rules.
//! - [`Etcd`]: a fleet of hubs sharing one etcd cluster (docs/scaling.md). Each hub holds
//!   one lease; every name it claims is a key attached to that lease, created only if absent
//!   (a transaction on the key's create revision), so of two hubs racing for a name exactly
//!   one wins, and a hub that dies frees its names when its lease expires. Look-ups and
//!   listings come from a local copy kept current by an etcd watch, never from a poll.
//!
//! A hub never serves a name it cannot prove it holds: [`Directory::holds`] is true only
//! while the claim's lease is known to be alive (see [`Etcd`] for what that means when etcd
//! is unreachable).
//!
//! # Layout
//!
//! - `record` — the keys and values in etcd (pure, tested with exact bytes).
//! - `copy` — the watched copy: snapshots and watch events in, join/leave events out (pure).
//! - `local` — [`InProcess`].
//! - `etcd` — [`Etcd`]: its lease, claims, watch, and recovery after etcd was unreachable.

mod copy;
mod etcd;
mod local;
mod record;
#[cfg(test)]
mod tests;

use futures::future::BoxFuture;
use tokio::sync::broadcast;

pub(crate) use self::etcd::{Etcd, EtcdConfig};
pub(crate) use self::local::InProcess;
pub(crate) use self::record::{HubId, MAX_HUB_ID_LEN};

/// How many directory events a subscriber may fall behind before it misses some (it then
/// gets [`broadcast::error::RecvError::Lagged`] and re-reads [`Directory::names`]).
pub(crate) const EVENTS_CAPACITY: usize = 1024;

/// Where a published name is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    /// The hub that holds the name.
    pub(crate) hub: HubId,
    /// That hub's hub-to-hub address (empty for a hub that has none, such as a single hub).
    pub(crate) addr: String,
    /// Whether that hub is this one.
    pub(crate) here: bool,
}

/// A hub of the fleet, as its record in the directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HubInfo {
    /// Its id.
    pub(crate) id: HubId,
    /// Its hub-to-hub address.
    pub(crate) addr: String,
}

/// A change of the directory, as seen by this hub.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// `name` was published (on this hub or another).
    Joined {
        /// The name.
        name: String,
        /// The hub that holds it.
        hub: HubId,
    },
    /// `name` is no longer published (released, or its hub's lease expired).
    Left {
        /// The name.
        name: String,
        /// The hub that held it.
        hub: HubId,
    },
    /// This hub lost its claim on `name` for good: its lease expired while etcd was out of
    /// reach and another hub claimed the name meanwhile. The connection that published it
    /// here no longer owns it.
    Lost {
        /// The name.
        name: String,
    },
    /// A hub joined the fleet (its record appeared).
    HubUp(HubInfo),
    /// A hub left the fleet (its record was removed or its lease expired).
    HubDown {
        /// Its id.
        id: HubId,
    },
}

/// Why a directory operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum DirectoryError {
    /// Another connected peer, on this hub or another, holds the name.
    #[error("peer name {name:?} is already taken by another connected peer")]
    Taken {
        /// The name.
        name: String,
    },
    /// etcd could not be reached (or answered too late), or this hub's lease is not
    /// known to be alive. Nothing was claimed.
    #[error("the fleet's directory is unreachable")]
    Unreachable {
        /// What went wrong.
        #[source]
        cause: Unreachable,
    },
    /// The configuration cannot work (a bad endpoint URL or hub id).
    #[error("invalid fleet directory configuration: {what}")]
    Config {
        /// What is wrong with it.
        what: String,
    },
    /// The directory was closed.
    #[error("the fleet's directory is closed")]
    Closed,
}

/// Why the fleet's directory is unreachable.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unreachable {
    /// An etcd call failed.
    #[error("etcd call failed")]
    Etcd(#[source] etcd_client::Error),
    /// An etcd call did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// This hub has no lease that is known to be alive (it is being renewed, or etcd has
    /// not been reached since it expired).
    #[error("this hub holds no live lease")]
    NoLease,
    /// Another live hub uses this hub's id.
    #[error("hub id {0} is in use by another hub")]
    HubIdInUse(HubId),
}

impl From<Unreachable> for DirectoryError {
    fn from(cause: Unreachable) -> DirectoryError {
        DirectoryError::Unreachable { cause }
    }
}

/// The fleet's directory, as one hub uses it. Cheap to share (`Arc<dyn Directory>`).
///
/// Names given to it are already valid peer names (`registry::validate_name`).
pub(crate) trait Directory: Send + Sync + 'static {
    /// This hub's id (the `hub` of the events about its own names).
    fn hub_id(&self) -> &HubId;

    /// Claims `name` for this hub: succeeds only if no hub of the fleet holds it (this hub
    /// included: a hub holds each name once). Fails with [`DirectoryError::Taken`] or,
    /// when the claim cannot be made, [`DirectoryError::Unreachable`].
    ///
    /// Not cancel-safe: a claim abandoned half-way may have been made; the directory then
    /// removes the orphan key itself (the next time it checks its keys against its claims).
    fn publish<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DirectoryError>>;

    /// Gives up this hub's claim on `name` (a no-op if it holds none). From the call on,
    /// [`Directory::holds`] is false for it. If etcd cannot be reached, the error says so
    /// and the key is removed later: when the directory next reaches etcd, or with the
    /// lease.
    fn release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DirectoryError>>;

    /// Whether this hub holds `name` and can prove it now (its claim's lease is alive).
    fn holds(&self, name: &str) -> bool;

    /// Who holds `name`, from the local watched copy (no round trip). A name held here is
    /// returned only while [`Directory::holds`] is true for it.
    fn lookup(&self, name: &str) -> Option<Holder>;

    /// Every published name in the fleet, sorted, from the local watched copy; a name this
    /// hub has claimed is in it as soon as its publish returns.
    fn names(&self) -> Vec<String>;

    /// The hubs of the fleet (this one included once it is registered), sorted by id.
    fn hubs(&self) -> Vec<HubInfo>;

    /// Join and leave events from now on (bounded: [`EVENTS_CAPACITY`]).
    fn subscribe(&self) -> broadcast::Receiver<Event>;

    /// Gives up every claim and leaves the fleet (the hub's lease is revoked, so its names
    /// are free at once), within a bounded time. Later publishes fail with
    /// [`DirectoryError::Closed`].
    fn close(&self) -> BoxFuture<'_, ()>;
}
