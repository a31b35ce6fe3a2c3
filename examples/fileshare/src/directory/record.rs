//! The directory's keys and values in etcd.
//!
//! Under a prefix (default `/netchan/fileshare`):
//!
//! - `PREFIX/peers/NAME` → `{"hub":"ID","addr":"HUB-TO-HUB ADDRESS","instance":"HEX"}`,
//!   attached to the holding hub's lease;
//! - `PREFIX/hubs/ID` → `{"addr":"HUB-TO-HUB ADDRESS","instance":"HEX"}`, attached to the
//!   same lease, so hubs find each other and a dead hub's record goes with its names.
//!
//! `instance` is a random number drawn by each hub process at start: it tells this process's
//! keys from those of an earlier process that ran with the same hub id.
//!
//! Values are JSON so that an operator reading the keys (`etcdctl get --prefix`) sees what
//! they mean. Anything that does not parse is ignored by readers, never trusted.

use serde::{Deserialize, Serialize};

/// Longest hub id, in bytes.
pub(crate) const MAX_HUB_ID_LEN: usize = 64;

/// A hub's id in the fleet: 1 to 64 bytes of ASCII letters, digits, `.`, `_`, `-`, `:`,
/// `[` and `]`, so a host name or a `host:port` address serves (it is a key segment in etcd
/// and appears in logs: no `/`, no spaces).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub(crate) struct HubId(String);

/// Why a hub id is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HubIdError {
    /// Empty, or longer than [`MAX_HUB_ID_LEN`].
    #[error("hub id must be 1 to {MAX_HUB_ID_LEN} bytes long, not {0}")]
    Length(usize),
    /// A character other than ASCII letters, digits, `.`, `_`, `-`, `:`, `[` and `]`.
    #[error("hub id {0:?} may hold only ASCII letters, digits, '.', '_', '-', ':', '[' and ']'")]
    Char(String),
}

impl HubId {
    /// Checks `id` and wraps it.
    pub(crate) fn new(id: impl Into<String>) -> Result<HubId, HubIdError> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_HUB_ID_LEN {
            return Err(HubIdError::Length(id.len()));
        }
        if !id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'[' | b']')
        }) {
            return Err(HubIdError::Char(id));
        }
        Ok(HubId(id))
    }
}

impl TryFrom<String> for HubId {
    type Error = HubIdError;

    fn try_from(id: String) -> Result<HubId, HubIdError> {
        HubId::new(id)
    }
}

impl From<HubId> for String {
    fn from(id: HubId) -> String {
        id.0
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A process's instance number, written in hex in the records.
pub(crate) type Instance = u64;

/// The value of a `peers/NAME` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PeerValue {
    /// The holding hub.
    pub(crate) hub: HubId,
    /// Its hub-to-hub address.
    pub(crate) addr: String,
    /// The holding hub process's instance.
    #[serde(with = "hex_u64")]
    pub(crate) instance: Instance,
}

/// The value of a `hubs/ID` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HubValue {
    /// The hub's hub-to-hub address.
    pub(crate) addr: String,
    /// The hub process's instance.
    #[serde(with = "hex_u64")]
    pub(crate) instance: Instance,
}

/// Longest value a reader accepts: a record is about 100 bytes; anything far larger was
/// not written by a hub.
const MAX_VALUE_LEN: usize = 4096;

/// Why a stored value was ignored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ValueError {
    /// Larger than any record a hub writes.
    #[error("value of {0} bytes is too long for a directory record")]
    TooLong(usize),
    /// Not the JSON of a record.
    #[error("value is not a directory record")]
    Json(#[source] serde_json::Error),
}

impl PeerValue {
    /// The stored form.
    pub(crate) fn encode(&self) -> Vec<u8> {
        // A struct of strings serialises without fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored value.
    pub(crate) fn decode(bytes: &[u8]) -> Result<PeerValue, ValueError> {
        decode(bytes)
    }
}

impl HubValue {
    /// The stored form.
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored value.
    pub(crate) fn decode(bytes: &[u8]) -> Result<HubValue, ValueError> {
        decode(bytes)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ValueError> {
    if bytes.len() > MAX_VALUE_LEN {
        return Err(ValueError::TooLong(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(ValueError::Json)
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

/// A key of the directory, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key {
    /// `PREFIX/peers/NAME`.
    Peer(String),
    /// `PREFIX/hubs/ID`.
    Hub(HubId),
}

/// Where the directory's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The prefix with one trailing `/`.
    root: String,
}

impl Layout {
    /// The layout under `prefix` (a trailing `/` is optional).
    pub(crate) fn new(prefix: &str) -> Layout {
        Layout {
            root: format!("{}/", prefix.trim_end_matches('/')),
        }
    }

    /// The prefix of every key (watched and read as one range).
    pub(crate) fn root(&self) -> &str {
        &self.root
    }

    /// The key of peer `name`.
    pub(crate) fn peer(&self, name: &str) -> String {
        format!("{}peers/{name}", self.root)
    }

    /// The key of hub `id`.
    pub(crate) fn hub(&self, id: &HubId) -> String {
        format!("{}hubs/{id}", self.root)
    }

    /// Parses a key read under [`Layout::root`]; `None` for anything else.
    pub(crate) fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.root)?;
        if let Some(name) = rest.strip_prefix("peers/") {
            // Names are checked the same way as on publish: a key no hub could have
            // written is not a peer.
            return crate::hub::registry::validate_name(name)
                .ok()
                .map(|()| Key::Peer(name.to_owned()));
        }
        if let Some(id) = rest.strip_prefix("hubs/") {
            return HubId::new(id).ok().map(Key::Hub);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_short_plain_words() {
        for ok in [
            "hub-1",
            "eu.west_2",
            "127.0.0.1:8766",
            "[::1]:8766",
            &"h".repeat(64),
        ] {
            HubId::new(ok).unwrap();
        }
        assert_eq!(HubId::new(""), Err(HubIdError::Length(0)));
        assert_eq!(HubId::new("h".repeat(65)), Err(HubIdError::Length(65)));
        for bad in ["a/b", "a b", "ünï", "a\n"] {
            assert!(
                matches!(HubId::new(bad), Err(HubIdError::Char(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keys_are_laid_out_under_the_prefix() {
        let l = Layout::new("/netchan/fileshare/");
        assert_eq!(l.root(), "/netchan/fileshare/");
        assert_eq!(l.peer("bob"), "/netchan/fileshare/peers/bob");
        let id = HubId::new("hub-2").unwrap();
        assert_eq!(l.hub(&id), "/netchan/fileshare/hubs/hub-2");
        assert_eq!(Layout::new("/x"), Layout::new("/x/"));
    }

    #[test]
    fn keys_parse_back_and_foreign_keys_are_ignored() {
        let l = Layout::new("/netchan/fileshare");
        assert_eq!(
            l.parse(b"/netchan/fileshare/peers/bob"),
            Some(Key::Peer("bob".into()))
        );
        assert_eq!(
            l.parse(b"/netchan/fileshare/peers/a/b"),
            Some(Key::Peer("a/b".into()))
        );
        assert_eq!(
            l.parse(b"/netchan/fileshare/hubs/hub-2"),
            Some(Key::Hub(HubId::new("hub-2").unwrap()))
        );
        for foreign in [
            &b"/netchan/fileshare/other/x"[..],
            b"/netchan/fileshare/peers/",
            b"/netchan/fileshare/peers/a b",
            b"/netchan/fileshare/hubs/a/b",
            b"/elsewhere/peers/bob",
            b"/netchan/fileshare/peers/\xff",
        ] {
            assert_eq!(l.parse(foreign), None, "{foreign:?}");
        }
    }

    #[test]
    fn values_are_json_with_the_instance_in_hex() {
        let v = PeerValue {
            hub: HubId::new("hub-2").unwrap(),
            addr: "127.0.0.1:7000".into(),
            instance: 0xab,
        };
        let bytes = v.encode();
        assert_eq!(
            bytes,
            br#"{"hub":"hub-2","addr":"127.0.0.1:7000","instance":"00000000000000ab"}"#
        );
        assert_eq!(PeerValue::decode(&bytes).unwrap(), v);
        let h = HubValue {
            addr: "[::1]:7001".into(),
            instance: u64::MAX,
        };
        assert_eq!(
            h.encode(),
            br#"{"addr":"[::1]:7001","instance":"ffffffffffffffff"}"#
        );
        assert_eq!(HubValue::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn values_that_no_hub_wrote_are_refused_without_panicking() {
        for bad in [
            &b""[..],
            b"not json",
            br#"{"hub":"a/b","addr":"x","instance":"00"}"#,
            br#"{"hub":"h","addr":"x","instance":"zz"}"#,
            br#"{"hub":"h","addr":"x"}"#,
            br#"{"hub":"h","addr":"x","instance":"1ffffffffffffffff"}"#,
        ] {
            assert!(PeerValue::decode(bad).is_err(), "{bad:?}");
        }
        let huge = vec![b' '; MAX_VALUE_LEN + 1];
        assert!(matches!(
            PeerValue::decode(&huge),
            Err(ValueError::TooLong(_))
        ));
    }
}
