//! The SHA-256 of files the exporter has read whole, kept by file identity and version, so
//! that a file read again (by another reader, from the start or resumed) is not hashed again.
//!
//! Hashing is most of what a read costs the exporter (SHA-256 runs at about 1.3 GB/s per core
//! here, slower than the rest of the read together), and a file shared through a hub is
//! typically read more than once.
//!
//! # When a digest may be reused
//!
//! An entry is keyed by the file's device and inode and holds the [`Version`] (size,
//! modification time, change time) the bytes were read at. A later read reuses it only for the
//! same inode at the same version. What makes that sound is the change time: every change of
//! content sets it to the kernel's clock, which user space cannot set back. A change after the
//! read began is therefore stamped no earlier than the read's start less the file system's
//! timestamp grain; a digest is kept only if the version's change time is more than
//! [`SETTLE`] (larger than the coarsest grain in use, FAT's two seconds) before the read
//! began, so no later change can carry the same stamp. A file changed just before it was read
//! is simply hashed again next time. Changes during the read itself are caught as before, by
//! the version check at the end of the read.
//!
//! The cache is bounded ([`MAX_DIGESTS`] entries, the least recently used goes first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Version;
use crate::proto::DIGEST_LEN;

/// How much older than the start of a read a file's change time must be for its digest to be
/// kept (see the module docs).
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// Most digests kept: a few hundred KiB at most.
pub(crate) const MAX_DIGESTS: usize = 4096;

/// Which file: device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileId {
    /// `st_dev`.
    pub(crate) dev: u64,
    /// `st_ino`.
    pub(crate) ino: u64,
}

/// A file's SHA-256.
pub(crate) type Digest = [u8; DIGEST_LEN];

/// The digests of whole files read so far (see the module docs). Shared by all reads of one
/// exporter.
#[derive(Debug)]
pub(crate) struct Digests {
    inner: Mutex<Inner>,
    settle: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<FileId, Entry>,
    /// Bumped at each use; the entry with the smallest `used` is evicted first.
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    version: Version,
    digest: Digest,
    used: u64,
}

impl Digests {
    /// An empty cache that keeps digests of files changed at least `settle` before their read
    /// began ([`SETTLE`] outside tests).
    pub(crate) fn new(settle: Duration) -> Digests {
        Digests {
            inner: Mutex::new(Inner::default()),
            settle,
        }
    }

    /// The digest of `id` at `version`, if a whole read of that version computed it.
    pub(crate) fn get(&self, id: FileId, version: &Version) -> Option<Digest> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.clock += 1;
        let clock = inner.clock;
        let e = inner.entries.get_mut(&id)?;
        if e.version != *version {
            return None;
        }
        e.used = clock;
        Some(e.digest)
    }

    /// Records `digest`, computed from the bytes of `id` at `version` by a read that began at
    /// `began`, if the version is settled (see the module docs); returns whether it was kept.
    pub(crate) fn insert(
        &self,
        id: FileId,
        version: &Version,
        began: SystemTime,
        digest: Digest,
    ) -> bool {
        if !settled(version, began, self.settle) {
            return false;
        }
        self.put(id, *version, digest);
        true
    }

    /// Records `digest` for `id` at `version` unconditionally.
    fn put(&self, id: FileId, version: Version, digest: Digest) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.clock += 1;
        let used = inner.clock;
        if inner.entries.len() >= MAX_DIGESTS && !inner.entries.contains_key(&id) {
            // O(MAX_DIGESTS), once per whole file read when full.
            if let Some(oldest) = inner.entries.iter().min_by_key(|(_, e)| e.used) {
                let oldest = *oldest.0;
                inner.entries.remove(&oldest);
            }
        }
        inner.entries.insert(
            id,
            Entry {
                version,
                digest,
                used,
            },
        );
    }

    /// How many digests are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    /// Records `digest` whatever the version's age (tests only: to show which digest a read
    /// sends).
    #[cfg(test)]
    pub(crate) fn put_for_test(&self, id: FileId, version: Version, digest: Digest) {
        self.put(id, version, digest);
    }
}

/// Whether `version`'s change time is known and more than `settle` before `began`.
fn settled(version: &Version, began: SystemTime, settle: Duration) -> bool {
    let (secs, nanos) = version.ctime;
    if secs <= 0 {
        // Unknown (0) or before 1970: no stamp to rely on.
        return false;
    }
    let changed = UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos);
    match began.duration_since(changed) {
        Ok(age) => age > settle,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(size: u64, ctime: i64) -> Version {
        Version {
            size,
            mtime: (ctime, 0),
            ctime: (ctime, 0),
            mode: 0o644,
        }
    }

    const ID: FileId = FileId { dev: 1, ino: 2 };

    #[test]
    fn a_digest_is_kept_only_for_a_version_settled_before_the_read_began() {
        let d = Digests::new(SETTLE);
        let began = UNIX_EPOCH + Duration::from_secs(1_000);
        // Changed 1 s before the read: a later change could carry the same stamp.
        assert!(!d.insert(ID, &version(5, 999), began, [1; 32]));
        // Exactly SETTLE before: still not.
        assert!(!d.insert(ID, &version(5, 998), began, [1; 32]));
        // Unknown change time.
        assert!(!d.insert(ID, &version(5, 0), began, [1; 32]));
        assert_eq!(d.len(), 0);
        assert!(d.insert(ID, &version(5, 997), began, [1; 32]));
        assert_eq!(d.get(ID, &version(5, 997)), Some([1; 32]));
    }

    #[test]
    fn a_digest_is_used_only_for_the_same_file_at_the_same_version() {
        let d = Digests::new(Duration::ZERO);
        let began = UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(d.insert(ID, &version(5, 900), began, [7; 32]));
        assert_eq!(d.get(ID, &version(5, 900)), Some([7; 32]));
        assert_eq!(d.get(ID, &version(6, 900)), None, "another size");
        assert_eq!(d.get(ID, &version(5, 901)), None, "another change time");
        assert_eq!(d.get(FileId { dev: 1, ino: 3 }, &version(5, 900)), None);
        // A newer version replaces the entry.
        assert!(d.insert(ID, &version(6, 950), began, [8; 32]));
        assert_eq!(d.get(ID, &version(5, 900)), None);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
        let d = Digests::new(Duration::ZERO);
        let began = UNIX_EPOCH + Duration::from_secs(1_000);
        let v = version(1, 900);
        for ino in 0..MAX_DIGESTS as u64 {
            d.insert(FileId { dev: 0, ino }, &v, began, [0; 32]);
        }
        // Inode 0 is used again, so inode 1 is now the least recently used.
        assert!(d.get(FileId { dev: 0, ino: 0 }, &v).is_some());
        d.insert(
            FileId {
                dev: 0,
                ino: u64::MAX,
            },
            &v,
            began,
            [0; 32],
        );
        assert_eq!(d.len(), MAX_DIGESTS);
        assert!(d.get(FileId { dev: 0, ino: 0 }, &v).is_some());
        assert!(d.get(FileId { dev: 0, ino: 1 }, &v).is_none());
        assert!(d
            .get(
                FileId {
                    dev: 0,
                    ino: u64::MAX
                },
                &v
            )
            .is_some());
    }
}
