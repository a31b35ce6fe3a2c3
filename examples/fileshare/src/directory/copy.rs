//! The watched copy of the directory: every peer and hub record, as of one etcd revision.
//!
//! Pure state, no I/O: a snapshot (a ranged read at a revision) or watch events go in, and
//! the join/leave events that the change means come out. The etcd layer feeds it only in
//! revision order (one snapshot, then the watch from the revision after it), and it drops
//! anything below the revision it already has, so a replayed older event changes nothing.
//! Events *at* that revision are applied: one transaction (a lease expiring with all its
//! keys) makes several events with one revision.

use std::collections::BTreeMap;

use tracing::debug;

use super::record::{HubId, HubValue, Instance, Key, Layout, PeerValue};
use super::{Event, HubInfo};

/// One key-value pair as etcd stores it (decoupled from the client library's types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kv {
    /// The key.
    pub(crate) key: Vec<u8>,
    /// The value.
    pub(crate) value: Vec<u8>,
    /// The revision that created the key.
    pub(crate) create_revision: i64,
    /// The revision of its last change.
    pub(crate) mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub(crate) lease: i64,
}

/// A published peer in the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerEntry {
    /// Its record.
    pub(crate) value: PeerValue,
    /// The revision that created the key.
    pub(crate) create_revision: i64,
    /// The revision of its last change.
    pub(crate) mod_revision: i64,
    /// The lease it is attached to.
    pub(crate) lease: i64,
}

/// The copy.
#[derive(Debug)]
pub(crate) struct Copy {
    layout: Layout,
    peers: BTreeMap<String, PeerEntry>,
    hubs: BTreeMap<HubId, HubValue>,
    revision: i64,
}

impl Copy {
    /// An empty copy of the keys under `layout`, at revision 0.
    pub(crate) fn new(layout: Layout) -> Copy {
        Copy {
            layout,
            peers: BTreeMap::new(),
            hubs: BTreeMap::new(),
            revision: 0,
        }
    }

    /// The revision the copy is current to.
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// Replaces the whole copy with a snapshot read at `revision`, returning the events
    /// that turn the old copy into the new one (leaves before joins).
    pub(crate) fn reset(&mut self, kvs: impl IntoIterator<Item = Kv>, revision: i64) -> Vec<Event> {
        let mut fresh = Copy::new(self.layout.clone());
        for kv in kvs {
            fresh.insert(&kv);
        }
        let mut events = Vec::new();
        for (name, old) in &self.peers {
            match fresh.peers.get(name) {
                Some(new) if same_holder(&old.value, &new.value) => {}
                _ => events.push(Event::Left {
                    name: name.clone(),
                    hub: old.value.hub.clone(),
                }),
            }
        }
        for id in self.hubs.keys() {
            if !fresh.hubs.contains_key(id) {
                events.push(Event::HubDown { id: id.clone() });
            }
        }
        for (id, new) in &fresh.hubs {
            if self.hubs.get(id) != Some(new) {
                events.push(Event::HubUp(HubInfo {
                    id: id.clone(),
                    addr: new.addr.clone(),
                }));
            }
        }
        for (name, new) in &fresh.peers {
            match self.peers.get(name) {
                Some(old) if same_holder(&old.value, &new.value) => {}
                _ => events.push(Event::Joined {
                    name: name.clone(),
                    hub: new.value.hub.clone(),
                }),
            }
        }
        self.peers = fresh.peers;
        self.hubs = fresh.hubs;
        self.revision = revision;
        events
    }

    /// Applies a put seen by the watch.
    pub(crate) fn put(&mut self, kv: &Kv) -> Vec<Event> {
        if kv.mod_revision < self.revision {
            return Vec::new();
        }
        self.revision = kv.mod_revision;
        match self.layout.parse(&kv.key) {
            Some(Key::Peer(name)) => {
                let Some(value) = peer_value(&name, &kv.value) else {
                    // An unreadable record replaces a readable one: the old holder is gone.
                    return self.remove_peer(&name).into_iter().collect();
                };
                let mut events = Vec::new();
                let old = self.peers.insert(
                    name.clone(),
                    PeerEntry {
                        value: value.clone(),
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                        lease: kv.lease,
                    },
                );
                match old {
                    Some(old) if same_holder(&old.value, &value) => {}
                    Some(old) => {
                        events.push(Event::Left {
                            name: name.clone(),
                            hub: old.value.hub,
                        });
                        events.push(Event::Joined {
                            name,
                            hub: value.hub,
                        });
                    }
                    None => events.push(Event::Joined {
                        name,
                        hub: value.hub,
                    }),
                }
                events
            }
            Some(Key::Hub(id)) => match HubValue::decode(&kv.value) {
                Ok(value) => {
                    let addr = value.addr.clone();
                    if self.hubs.insert(id.clone(), value.clone()) == Some(value) {
                        Vec::new()
                    } else {
                        vec![Event::HubUp(HubInfo { id, addr })]
                    }
                }
                Err(e) => {
                    debug!(hub = %id, error = %e, "ignoring an unreadable hub record");
                    self.remove_hub(&id).into_iter().collect()
                }
            },
            None => Vec::new(),
        }
    }

    /// Applies a delete seen by the watch (`revision` is the deletion's revision).
    pub(crate) fn delete(&mut self, key: &[u8], revision: i64) -> Vec<Event> {
        if revision < self.revision {
            return Vec::new();
        }
        self.revision = revision;
        match self.layout.parse(key) {
            Some(Key::Peer(name)) => self.remove_peer(&name).into_iter().collect(),
            Some(Key::Hub(id)) => self.remove_hub(&id).into_iter().collect(),
            None => Vec::new(),
        }
    }

    /// The entry of peer `name`.
    pub(crate) fn peer(&self, name: &str) -> Option<&PeerEntry> {
        self.peers.get(name)
    }

    /// Every peer name, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }

    /// The peers whose records name `instance` (a hub process), with their entries.
    pub(crate) fn peers_of(&self, instance: Instance) -> impl Iterator<Item = (&str, &PeerEntry)> {
        self.peers
            .iter()
            .filter(move |(_, e)| e.value.instance == instance)
            .map(|(n, e)| (n.as_str(), e))
    }

    /// Every hub, sorted by id.
    pub(crate) fn hubs(&self) -> Vec<HubInfo> {
        self.hubs
            .iter()
            .map(|(id, v)| HubInfo {
                id: id.clone(),
                addr: v.addr.clone(),
            })
            .collect()
    }

    /// The record of hub `id`.
    #[cfg(test)]
    pub(crate) fn hub(&self, id: &HubId) -> Option<&HubValue> {
        self.hubs.get(id)
    }

    fn insert(&mut self, kv: &Kv) {
        match self.layout.parse(&kv.key) {
            Some(Key::Peer(name)) => {
                if let Some(value) = peer_value(&name, &kv.value) {
                    self.peers.insert(
                        name,
                        PeerEntry {
                            value,
                            create_revision: kv.create_revision,
                            mod_revision: kv.mod_revision,
                            lease: kv.lease,
                        },
                    );
                }
            }
            Some(Key::Hub(id)) => match HubValue::decode(&kv.value) {
                Ok(value) => {
                    self.hubs.insert(id, value);
                }
                Err(e) => debug!(hub = %id, error = %e, "ignoring an unreadable hub record"),
            },
            None => {}
        }
    }

    fn remove_peer(&mut self, name: &str) -> Option<Event> {
        self.peers.remove(name).map(|old| Event::Left {
            name: name.to_owned(),
            hub: old.value.hub,
        })
    }

    fn remove_hub(&mut self, id: &HubId) -> Option<Event> {
        self.hubs
            .remove(id)
            .map(|_| Event::HubDown { id: id.clone() })
    }
}

fn peer_value(name: &str, bytes: &[u8]) -> Option<PeerValue> {
    match PeerValue::decode(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            debug!(peer = name, error = %e, "ignoring an unreadable peer record");
            None
        }
    }
}

/// Whether two records of one name mean the same holder (a re-put by the same hub process
/// is no leave and join).
fn same_holder(a: &PeerValue, b: &PeerValue) -> bool {
    a.hub == b.hub && a.instance == b.instance
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("/p")
    }

    fn hub(id: &str) -> HubId {
        HubId::new(id).unwrap()
    }

    fn peer_kv(name: &str, hub_id: &str, instance: u64, create: i64, modr: i64) -> Kv {
        Kv {
            key: layout().peer(name).into_bytes(),
            value: PeerValue {
                hub: hub(hub_id),
                addr: format!("{hub_id}:1"),
                instance,
            }
            .encode(),
            create_revision: create,
            mod_revision: modr,
            lease: 7,
        }
    }

    fn hub_kv(id: &str, addr: &str, rev: i64) -> Kv {
        Kv {
            key: layout().hub(&hub(id)).into_bytes(),
            value: HubValue {
                addr: addr.into(),
                instance: 1,
            }
            .encode(),
            create_revision: rev,
            mod_revision: rev,
            lease: 7,
        }
    }

    fn joined(name: &str, h: &str) -> Event {
        Event::Joined {
            name: name.into(),
            hub: hub(h),
        }
    }

    fn left(name: &str, h: &str) -> Event {
        Event::Left {
            name: name.into(),
            hub: hub(h),
        }
    }

    #[test]
    fn puts_and_deletes_become_joins_and_leaves() {
        let mut c = Copy::new(layout());
        assert_eq!(
            c.put(&peer_kv("bob", "h1", 1, 5, 5)),
            vec![joined("bob", "h1")]
        );
        assert_eq!(c.names(), vec!["bob"]);
        assert_eq!(c.peer("bob").unwrap().create_revision, 5);
        // A re-put by the same hub process is no event.
        assert_eq!(c.put(&peer_kv("bob", "h1", 1, 5, 6)), vec![]);
        assert_eq!(c.peer("bob").unwrap().mod_revision, 6);
        // The same name now held by another hub: it left one and joined the other.
        assert_eq!(
            c.put(&peer_kv("bob", "h2", 9, 7, 7)),
            vec![left("bob", "h1"), joined("bob", "h2")]
        );
        assert_eq!(
            c.delete(&layout().peer("bob").into_bytes(), 8),
            vec![left("bob", "h2")]
        );
        assert!(c.names().is_empty());
        assert_eq!(c.revision(), 8);
    }

    #[test]
    fn events_below_the_copys_revision_change_nothing() {
        let mut c = Copy::new(layout());
        c.reset([peer_kv("bob", "h1", 1, 3, 3)], 10);
        assert_eq!(c.put(&peer_kv("carol", "h1", 1, 9, 9)), vec![]);
        assert_eq!(c.delete(&layout().peer("bob").into_bytes(), 9), vec![]);
        assert_eq!(c.names(), vec!["bob"]);
        assert_eq!(
            c.put(&peer_kv("carol", "h1", 1, 11, 11)),
            vec![joined("carol", "h1")]
        );
    }

    #[test]
    fn several_events_of_one_revision_all_apply() {
        // A lease expiring deletes its hub record and all its names in one revision.
        let mut c = Copy::new(layout());
        c.put(&hub_kv("h1", "a:1", 1));
        c.put(&peer_kv("alice", "h1", 1, 2, 2));
        c.put(&peer_kv("bob", "h1", 1, 3, 3));
        let mut events = Vec::new();
        events.extend(c.delete(&layout().peer("alice").into_bytes(), 4));
        events.extend(c.delete(&layout().peer("bob").into_bytes(), 4));
        events.extend(c.delete(&layout().hub(&hub("h1")).into_bytes(), 4));
        assert_eq!(
            events,
            vec![
                left("alice", "h1"),
                left("bob", "h1"),
                Event::HubDown { id: hub("h1") }
            ]
        );
        assert!(c.names().is_empty() && c.hubs().is_empty());
    }

    #[test]
    fn a_snapshot_replaces_the_copy_with_leaves_before_joins() {
        let mut c = Copy::new(layout());
        c.put(&hub_kv("h1", "a:1", 1));
        c.put(&peer_kv("alice", "h1", 1, 2, 2));
        c.put(&peer_kv("bob", "h1", 1, 3, 3));
        let events = c.reset(
            [
                hub_kv("h2", "b:1", 4),
                peer_kv("bob", "h1", 1, 3, 3),
                peer_kv("carol", "h2", 2, 5, 5),
            ],
            20,
        );
        assert_eq!(
            events,
            vec![
                left("alice", "h1"),
                Event::HubDown { id: hub("h1") },
                Event::HubUp(HubInfo {
                    id: hub("h2"),
                    addr: "b:1".into()
                }),
                joined("carol", "h2"),
            ]
        );
        assert_eq!(c.names(), vec!["bob", "carol"]);
        assert_eq!(c.revision(), 20);
        assert_eq!(
            c.peers_of(2).map(|(n, _)| n).collect::<Vec<_>>(),
            vec!["carol"]
        );
    }

    #[test]
    fn hub_records_come_and_go() {
        let mut c = Copy::new(layout());
        let up = Event::HubUp(HubInfo {
            id: hub("h1"),
            addr: "a:1".into(),
        });
        assert_eq!(c.put(&hub_kv("h1", "a:1", 1)), vec![up.clone()]);
        assert_eq!(c.put(&hub_kv("h1", "a:1", 2)), vec![], "same record again");
        assert_eq!(c.hubs().len(), 1);
        assert_eq!(c.hub(&hub("h1")).unwrap().addr, "a:1");
        assert_eq!(
            c.delete(&layout().hub(&hub("h1")).into_bytes(), 3),
            vec![Event::HubDown { id: hub("h1") }]
        );
        assert!(c.hubs().is_empty());
    }

    #[test]
    fn unreadable_and_foreign_keys_are_ignored() {
        let mut c = Copy::new(layout());
        let garbage = Kv {
            key: layout().peer("bob").into_bytes(),
            value: b"\x00garbage".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        };
        assert_eq!(c.put(&garbage), vec![]);
        let foreign = Kv {
            key: b"/p/else/x".to_vec(),
            ..garbage.clone()
        };
        assert_eq!(
            c.put(&Kv {
                mod_revision: 2,
                ..foreign
            }),
            vec![]
        );
        assert!(c.names().is_empty());
        // A readable record overwritten by garbage: the holder is gone.
        c.put(&peer_kv("bob", "h1", 1, 3, 3));
        assert_eq!(
            c.put(&Kv {
                mod_revision: 4,
                ..garbage
            }),
            vec![left("bob", "h1")]
        );
        assert!(c.names().is_empty());
        c.reset(
            [Kv {
                key: layout().peer("x y").into_bytes(),
                value: peer_kv("x", "h1", 1, 1, 1).value,
                create_revision: 1,
                mod_revision: 1,
                lease: 0,
            }],
            5,
        );
        assert!(
            c.names().is_empty(),
            "a name no hub could publish is not listed"
        );
    }
}
