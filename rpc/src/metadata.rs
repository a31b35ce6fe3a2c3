//! [`Metadata`]: string key/value pairs that travel with a request.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::status::Status;

/// A hook run on every call before it goes out (client) or before its
/// handler runs (server): it gets the method (`"Service.Method"`) and the
/// call's metadata, may read and change the metadata, and refuses the call
/// by returning an error status (sent to the caller as the call's answer;
/// on the client, the call fails without being sent).
///
/// Installed with [`Client::with_interceptor`](crate::Client::with_interceptor)
/// and [`Server::intercept`](crate::Server::intercept); runs synchronously
/// on the conn's reader (server) or in the caller's task (client), so keep
/// it cheap.
pub type Interceptor = Arc<dyn Fn(&str, &mut Metadata) -> Result<(), Status> + Send + Sync>;

/// A small ordered list of string key/value pairs sent with a request (an
/// auth token, a trace id). Keys may repeat; [`Metadata::get`] returns the
/// first match. Its encoded size counts toward the request's message size.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    entries: Vec<(String, String)>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// Appends `key = value`.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.entries.push((key.into(), value.into()));
        self
    }

    /// The first value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces every value stored under `key` with `value` (appends it if
    /// there is none).
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        let key = key.into();
        self.entries.retain(|(k, _)| *k != key);
        self.entries.push((key, value.into()));
        self
    }

    /// Removes every value stored under `key`.
    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.entries.retain(|(k, _)| k != key);
        self
    }

    /// All pairs, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Metadata {
        Metadata {
            entries: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}
