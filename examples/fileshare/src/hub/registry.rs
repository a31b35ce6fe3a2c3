//! The hub's table of published peers: name → the connection that published it.
//!
//! Pure bookkeeping, no I/O, so the rules (valid names, uniqueness, a departing connection
//! removes only its own entry) are tested on their own.

use std::collections::HashMap;
use std::sync::Mutex;

/// Longest peer name, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 64;

/// Identifies one client connection at the hub for its whole life (never reused).
pub(crate) type ConnId = u64;

/// Why a peer name is not acceptable.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NameError {
    /// The name is empty.
    #[error("peer name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("peer name is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains a control character or whitespace.
    #[error("peer name {name:?} contains a control character or whitespace")]
    BadChar {
        /// The name (escaped when displayed).
        name: String,
    },
    /// Another connected peer already uses the name.
    #[error("peer name {name:?} is already taken by another connected peer")]
    Taken {
        /// The name.
        name: String,
    },
}

/// Checks the syntax of a peer name: 1 to 64 bytes, no control characters, no whitespace
/// (names are words in REPL commands).
pub(crate) fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(NameError::BadChar {
            name: name.to_owned(),
        });
    }
    Ok(())
}

struct Slot<T> {
    conn: ConnId,
    handle: T,
}

/// Published peers. `T` is whatever the hub needs to reach a peer (cheap to clone).
pub(crate) struct Registry<T> {
    // A std mutex: every critical section is a few map operations, never held across `.await`.
    peers: Mutex<HashMap<String, Slot<T>>>,
}

impl<T: Clone> Registry<T> {
    /// An empty registry.
    pub(crate) fn new() -> Registry<T> {
        Registry {
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<T>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still consistent.
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes `name` for connection `conn`. Fails if the name is invalid or taken.
    pub(crate) fn insert(&self, name: &str, conn: ConnId, handle: T) -> Result<(), NameError> {
        validate_name(name)?;
        let mut peers = self.lock();
        if peers.contains_key(name) {
            return Err(NameError::Taken {
                name: name.to_owned(),
            });
        }
        peers.insert(name.to_owned(), Slot { conn, handle });
        Ok(())
    }

    /// Removes `name` if (and only if) connection `conn` published it. Returns whether it did.
    pub(crate) fn remove(&self, name: &str, conn: ConnId) -> bool {
        let mut peers = self.lock();
        match peers.get(name) {
            Some(slot) if slot.conn == conn => {
                peers.remove(name);
                true
            }
            _ => false,
        }
    }

    /// The handle of the peer published as `name`.
    pub(crate) fn get(&self, name: &str) -> Option<T> {
        self.lock().get(name).map(|s| s.handle.clone())
    }

    /// All published names, sorted.
    #[cfg(test)]
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// How many peers are published.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_accepted() {
        for n in ["alice", "second-client", "ünïcødé", &"x".repeat(64)] {
            validate_name(n).unwrap();
        }
    }

    #[test]
    fn empty_overlong_and_control_character_names_are_refused() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_name(&"x".repeat(65)),
            Err(NameError::TooLong { len: 65 })
        );
        for n in ["a\u{7}b", "a\nb", "a b", "tab\t", "\u{1b}[31m"] {
            assert!(
                matches!(validate_name(n), Err(NameError::BadChar { .. })),
                "{n:?}"
            );
        }
        let msg = validate_name("a\u{1b}b").unwrap_err().to_string();
        assert!(
            !msg.contains('\u{1b}'),
            "control characters are escaped: {msg}"
        );
    }

    #[test]
    fn a_second_peer_with_the_same_name_is_refused() {
        let r = Registry::new();
        r.insert("alice", 1, "a1").unwrap();
        assert_eq!(
            r.insert("alice", 2, "a2"),
            Err(NameError::Taken {
                name: "alice".into()
            })
        );
        assert_eq!(r.get("alice"), Some("a1"));
    }

    #[test]
    fn a_departing_connection_removes_only_its_own_entry() {
        let r = Registry::new();
        r.insert("alice", 1, ()).unwrap();
        assert!(
            !r.remove("alice", 2),
            "another connection cannot remove alice"
        );
        assert_eq!(r.len(), 1);
        assert!(r.remove("alice", 1));
        assert_eq!(r.len(), 0);
        // The name is free again, for a new connection.
        r.insert("alice", 3, ()).unwrap();
        assert!(
            !r.remove("alice", 1),
            "a stale departure does not remove the new alice"
        );
        assert_eq!(r.names(), vec!["alice".to_owned()]);
    }

    #[test]
    fn names_are_listed_sorted() {
        let r = Registry::new();
        for (i, n) in ["carol", "alice", "bob"].into_iter().enumerate() {
            r.insert(n, i as u64, ()).unwrap();
        }
        assert_eq!(r.names(), vec!["alice", "bob", "carol"]);
        assert_eq!(r.get("dave"), None);
    }
}
