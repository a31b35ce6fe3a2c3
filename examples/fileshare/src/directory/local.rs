//! The directory of a hub on its own: the names live in this process.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;
use tokio::sync::broadcast;

use super::{Directory, DirectoryError, Event, Holder, HubId, HubInfo, EVENTS_CAPACITY};

/// The single hub's directory: every published name is held here, and a name is taken
/// while this hub holds it. Events are sent as the calls happen.
pub(crate) struct InProcess {
    id: HubId,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
}

struct State {
    names: BTreeSet<String>,
    closed: bool,
}

impl InProcess {
    /// An empty directory for the hub `id`.
    pub(crate) fn new(id: HubId) -> InProcess {
        InProcess {
            id,
            state: Mutex::new(State {
                names: BTreeSet::new(),
                closed: false,
            }),
            events: broadcast::channel(EVENTS_CAPACITY).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is one set operation and a send, so a poisoned lock still
        // holds a consistent set.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Directory for InProcess {
    fn hub_id(&self) -> &HubId {
        &self.id
    }

    fn publish<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DirectoryError>> {
        let result = {
            let mut state = self.lock();
            if state.closed {
                Err(DirectoryError::Closed)
            } else if state.names.insert(name.to_owned()) {
                // No receivers is fine: nobody listens yet.
                let _ = self.events.send(Event::Joined {
                    name: name.to_owned(),
                    hub: self.id.clone(),
                });
                Ok(())
            } else {
                Err(DirectoryError::Taken {
                    name: name.to_owned(),
                })
            }
        };
        Box::pin(std::future::ready(result))
    }

    fn release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DirectoryError>> {
        {
            let mut state = self.lock();
            if state.names.remove(name) {
                let _ = self.events.send(Event::Left {
                    name: name.to_owned(),
                    hub: self.id.clone(),
                });
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn holds(&self, name: &str) -> bool {
        self.lock().names.contains(name)
    }

    fn lookup(&self, name: &str) -> Option<Holder> {
        self.holds(name).then(|| Holder {
            hub: self.id.clone(),
            addr: String::new(),
            here: true,
        })
    }

    fn names(&self) -> Vec<String> {
        self.lock().names.iter().cloned().collect()
    }

    fn hubs(&self) -> Vec<HubInfo> {
        vec![HubInfo {
            id: self.id.clone(),
            addr: String::new(),
        }]
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        let mut state = self.lock();
        state.closed = true;
        for name in std::mem::take(&mut state.names) {
            let _ = self.events.send(Event::Left {
                name,
                hub: self.id.clone(),
            });
        }
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> InProcess {
        InProcess::new(HubId::new("solo").unwrap())
    }

    #[tokio::test]
    async fn a_name_is_held_once_until_released() {
        let d = dir();
        let mut events = d.subscribe();
        d.publish("bob").await.unwrap();
        assert!(matches!(
            d.publish("bob").await,
            Err(DirectoryError::Taken { name }) if name == "bob"
        ));
        assert!(d.holds("bob"));
        assert_eq!(
            d.lookup("bob"),
            Some(Holder {
                hub: HubId::new("solo").unwrap(),
                addr: String::new(),
                here: true
            })
        );
        d.publish("alice").await.unwrap();
        assert_eq!(d.names(), vec!["alice", "bob"]);
        d.release("bob").await.unwrap();
        d.release("bob").await.unwrap();
        assert!(!d.holds("bob"));
        assert_eq!(d.lookup("bob"), None);
        d.publish("bob").await.unwrap();
        let solo = HubId::new("solo").unwrap();
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e);
        }
        assert_eq!(
            seen,
            vec![
                Event::Joined {
                    name: "bob".into(),
                    hub: solo.clone()
                },
                Event::Joined {
                    name: "alice".into(),
                    hub: solo.clone()
                },
                Event::Left {
                    name: "bob".into(),
                    hub: solo.clone()
                },
                Event::Joined {
                    name: "bob".into(),
                    hub: solo
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_closed_directory_holds_nothing_and_refuses_publishes() {
        let d = dir();
        d.publish("bob").await.unwrap();
        d.close().await;
        assert!(d.names().is_empty());
        assert!(matches!(
            d.publish("carol").await,
            Err(DirectoryError::Closed)
        ));
    }
}
