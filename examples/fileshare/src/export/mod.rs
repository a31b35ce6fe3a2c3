//! The exporter's view of its file system: read-only access confined to one root directory.
//!
//! Every access goes through a [`cap_std::fs::Dir`] opened once on the root, so paths are
//! resolved relative to that open directory handle (openat-style), never by joining strings.
//! cap-std refuses `..` climbing above the handle, absolute paths, and symlinks whose target
//! resolves outside it — also through an intermediate directory and also when a directory is
//! swapped for a symlink between two accesses, because each component is resolved by the kernel
//! beneath the handle. A lexical pre-check gives the common mistakes a precise error before any
//! system call.
//!
//! Only regular files are served. The type is checked twice: before opening (so FIFOs, devices
//! and sockets are normally never opened at all) and again on the open descriptor (so a file
//! swapped for a FIFO in between is still refused). The open itself uses `O_NONBLOCK` so that a
//! FIFO swapped in at the last moment cannot block the exporter, and `O_NOCTTY` so a terminal
//! can never become the controlling terminal.
//!
//! Files are read in chunks of at most [`CHUNK_SIZE`] bytes with positioned reads on the open
//! descriptor; a file is never held in memory as a whole. A chunk the page cache holds is read
//! without waiting for the disk ([`OpenFile::read_cached`]), on the calling thread; the rest on
//! the blocking pool. The SHA-256 of a file read whole is kept for its next reads
//! ([`digests`]).
//!
//! Hidden files and directories (a name starting with `.`) are neither listed nor served unless
//! the sharer opted in ([`Root::open`]'s `show_hidden`): a path with a hidden component is
//! refused before any system call, and a symlink that resolves to one is refused too.
//!
//! [`service`] serves this to the hub as the [`Export`](crate::proto::Export) rpc service.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use cap_std::ambient_authority;
use cap_std::fs::{Dir, FileType, FileTypeExt, OpenOptions, OpenOptionsExt};

use crate::proto::{Entry, Kind, Listing};
use digests::{Digests, FileId};

pub(crate) mod digests;
mod service;

pub(crate) use service::export_server;
#[cfg(test)]
pub(crate) use service::ExportService;

/// Largest chunk one read returns: 1 MiB. Every window of a read is sized in bytes and
/// counted in chunks of this size ([`chunks`](crate::proto::chunks)), so the chunk size sets
/// the per-chunk costs (one rpc frame, one credit, the wake-ups of the tasks it crosses) and
/// not the memory a transfer holds. 1 MiB chunks took a loopback `get` through the hub from
/// 0.42x to 0.50x of a raw TCP copy (medians) against 256 KiB ones (docs/performance.md).
pub(crate) const CHUNK_SIZE: usize = 1024 * 1024;

/// Longest path accepted from a peer, in bytes (the Linux `PATH_MAX`).
pub(crate) const MAX_PATH_LEN: usize = 4096;

/// Most entries one `ls` returns; a larger directory is listed up to this many and marked
/// truncated, so one reply stays far below the RPC message size limit.
pub(crate) const MAX_LIST_ENTRIES: usize = 10_000;

/// Why the exporter refused or failed a request. Each variant names the path it is about.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    /// The path was absolute; peers' paths are always relative to the exported root.
    #[error("absolute path {path:?} refused: paths are relative to the exported directory")]
    Absolute {
        /// The path as requested.
        path: String,
    },
    /// The path (lexically, or through a symlink) leads outside the exported root.
    #[error("path {path:?} leads outside the exported directory")]
    Escape {
        /// The path as requested.
        path: String,
    },
    /// The path is malformed (NUL byte, too long).
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as requested (possibly long).
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Nothing exists at the path.
    #[error("no such file or directory: {path:?}")]
    NotFound {
        /// The path as requested.
        path: String,
    },
    /// A file was requested but the path is a directory.
    #[error("{path:?} is a directory, not a regular file (use ls)")]
    IsDirectory {
        /// The path as requested.
        path: String,
    },
    /// A directory listing was requested but the path is not a directory.
    #[error("{path:?} is not a directory")]
    NotDirectory {
        /// The path as requested.
        path: String,
    },
    /// The path is a FIFO, device, socket or other non-regular file, which are never served.
    #[error("{path:?} is a {kind}; only regular files are served")]
    NotRegular {
        /// The path as requested.
        path: String,
        /// What it is instead ("fifo", "character device", ...).
        kind: &'static str,
    },
    /// The file has more than one hard link and the sharer did not allow hard-linked files:
    /// another name of the same file may sit outside the exported directory.
    #[error(
        "{path:?} has {links} hard links (another name may be outside the exported \
         directory); the sharer must pass --allow-hard-links to serve it"
    )]
    HardLinked {
        /// The path as requested.
        path: String,
        /// Its link count.
        links: u64,
    },
    /// The requested offset is past the largest offset a read may start at
    /// ([`MAX_OFFSET`](crate::proto::MAX_OFFSET), 2^63 - 2).
    #[error("offset {offset} in {path:?} is past the largest possible file offset")]
    BadOffset {
        /// The path as requested.
        path: String,
        /// The offset asked for.
        offset: u64,
    },
    /// The operating system refused access.
    #[error("permission denied: {path:?}")]
    PermissionDenied {
        /// The path as requested.
        path: String,
    },
    /// The path names (or resolves to) a hidden file or directory and the sharer did not opt in.
    #[error("{path:?} is hidden; the sharer does not share hidden files")]
    Hidden {
        /// The path as requested.
        path: String,
    },
    /// The file changed (size or modification time) while it was being read, so the bytes
    /// sent are not one consistent version of it.
    #[error("{path:?} changed while it was being read ({detail}); try again")]
    Changed {
        /// The path as requested.
        path: String,
        /// What changed.
        detail: String,
    },
    /// Any other I/O failure.
    #[error("i/o error on {path:?}")]
    Io {
        /// The path as requested.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl ExportError {
    /// Maps an I/O error from an access to `path` to the most precise variant.
    fn from_io(path: &str, e: io::Error) -> ExportError {
        let path = path.to_owned();
        // cap-std reports escapes as PermissionDenied *without* an OS error code; a real EACCES
        // carries errno 13.
        if e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none() {
            return ExportError::Escape { path };
        }
        match e.kind() {
            io::ErrorKind::NotFound => ExportError::NotFound { path },
            io::ErrorKind::PermissionDenied => ExportError::PermissionDenied { path },
            io::ErrorKind::NotADirectory => ExportError::NotDirectory { path },
            io::ErrorKind::IsADirectory => ExportError::IsDirectory { path },
            _ if e.raw_os_error() == Some(libc::ENXIO) => ExportError::NotRegular {
                path,
                kind: "socket or device",
            },
            _ => ExportError::Io { path, source: e },
        }
    }
}

/// Classifying local objects into the wire's kinds.
impl Kind {
    /// Classifies a cap-std file type.
    pub(crate) fn of(t: FileType) -> Kind {
        if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else if t.is_char_device() {
            Kind::CharDevice
        } else if t.is_block_device() {
            Kind::BlockDevice
        } else {
            Kind::Other
        }
    }
}

/// Seconds since the Unix epoch of `t` (negative before it), 0 if unknown.
fn unix_secs(t: io::Result<std::time::SystemTime>) -> i64 {
    match t {
        Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        },
        Err(_) => 0,
    }
}

/// Whether a file name is hidden by the Unix convention (a leading dot; `.` and `..` are not
/// names).
pub(crate) fn is_hidden_name(name: &str) -> bool {
    name.starts_with('.') && name != "." && name != ".."
}

/// Whether any normal component of `p` is hidden.
fn has_hidden_component(p: &Path) -> bool {
    p.components().any(|c| match c {
        Component::Normal(n) => is_hidden_name(&n.to_string_lossy()),
        _ => false,
    })
}

/// Checks a requested path lexically and returns it as a relative path for cap-std.
///
/// The empty path and `.` mean the root itself. Absolute paths, NUL bytes, paths longer than
/// [`MAX_PATH_LEN`] and `..` components that climb above the root are refused. `..` that stays
/// inside (`a/../b`) is left for cap-std to resolve beneath the handle.
pub(crate) fn check_path(path: &str) -> Result<PathBuf, ExportError> {
    let invalid = |reason| ExportError::InvalidPath {
        path: truncate_for_error(path),
        reason,
    };
    if path.len() > MAX_PATH_LEN {
        return Err(invalid("longer than 4096 bytes"));
    }
    if path.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let p = Path::new(path);
    if p.has_root() {
        return Err(ExportError::Absolute {
            path: path.to_owned(),
        });
    }
    let mut depth: usize = 0;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth.checked_sub(1).ok_or_else(|| ExportError::Escape {
                    path: path.to_owned(),
                })?;
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ExportError::Absolute {
                    path: path.to_owned(),
                })
            }
        }
    }
    if p.as_os_str().is_empty() {
        Ok(PathBuf::from("."))
    } else {
        Ok(p.to_path_buf())
    }
}

fn truncate_for_error(path: &str) -> String {
    const KEEP: usize = 64;
    if path.len() <= KEEP {
        return path.to_owned();
    }
    let mut end = KEEP;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

/// The exported root: a cheap `Clone` handle around the open directory.
///
/// All methods are blocking (they make system calls); async callers run them on the blocking
/// pool (see [`Root::open_file_async`] and friends).
#[derive(Debug, Clone)]
pub(crate) struct Root {
    dir: Arc<Dir>,
    path: Arc<PathBuf>,
    show_hidden: bool,
    access_log: Option<AccessLog>,
    /// Whether files with more than one hard link are served (default: no).
    allow_hard_links: bool,
    /// Digests of files read whole, for their next reads.
    digests: Arc<Digests>,
}

/// Where the exporter reports each access to its files (`alice read notes.txt`), so the
/// sharer sees who reads what.
#[derive(Clone)]
pub(crate) struct AccessLog(pub(crate) Arc<dyn Fn(String) + Send + Sync>);

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

impl Root {
    /// Opens `path` as the exported root, hidden files not shared. This is the only
    /// ambient-authority access the exporter ever makes.
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let dir = Dir::open_ambient_dir(path, ambient_authority())?;
        // For messages: the sharer must see exactly which directory is exported.
        let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Root {
            dir: Arc::new(dir),
            path: Arc::new(shown),
            show_hidden: false,
            access_log: None,
            allow_hard_links: false,
            digests: Arc::new(Digests::new(digests::SETTLE)),
        })
    }

    /// Keeps the digests of files changed at least `settle` before their read (tests only:
    /// files written by a test are younger than [`digests::SETTLE`]).
    #[cfg(test)]
    pub(crate) fn digest_settle(mut self, settle: std::time::Duration) -> Root {
        self.digests = Arc::new(Digests::new(settle));
        self
    }

    /// The digests of files read whole.
    pub(crate) fn digests(&self) -> &Digests {
        &self.digests
    }

    /// Serves hidden files and directories too (if `yes`).
    pub(crate) fn show_hidden(mut self, yes: bool) -> Root {
        self.show_hidden = yes;
        self
    }

    /// Reports each access of a peer to `log`.
    pub(crate) fn access_log(mut self, log: AccessLog) -> Root {
        self.access_log = Some(log);
        self
    }

    /// Reports one access (`who` did `what`), if anyone listens.
    pub(crate) fn log_access(&self, who: &str, what: std::fmt::Arguments<'_>) {
        if let Some(AccessLog(log)) = &self.access_log {
            log(format!("{who} {what}"));
        }
    }

    /// Whether to serve files with more than one hard link. A hard link inside the root can
    /// name a file that also lives outside it (the same inode), which path checks cannot see,
    /// so by default such files are refused.
    pub(crate) fn allow_hard_links(mut self, allow: bool) -> Root {
        self.allow_hard_links = allow;
        self
    }

    /// The absolute path the root was opened from (for messages only; never used to access
    /// files).
    pub(crate) fn display_path(&self) -> &Path {
        &self.path
    }

    /// [`check_path`], plus the hidden-file rule: a hidden component in the path, or in what
    /// it resolves to beneath the root (a symlink to `.ssh/`), is refused.
    fn checked(&self, path: &str) -> Result<PathBuf, ExportError> {
        let rel = check_path(path)?;
        if self.show_hidden {
            return Ok(rel);
        }
        let hidden = || ExportError::Hidden {
            path: path.to_owned(),
        };
        if has_hidden_component(&rel) {
            return Err(hidden());
        }
        // Resolution errors (not found, escape) are left for the access itself to report.
        if let Ok(resolved) = self.dir.canonicalize(&rel) {
            if has_hidden_component(&resolved) {
                return Err(hidden());
            }
        }
        Ok(rel)
    }

    /// Describes the object at `path`, following symlinks that stay inside the root.
    pub(crate) fn stat(&self, path: &str) -> Result<Entry, ExportError> {
        let rel = self.checked(path)?;
        let meta = self
            .dir
            .metadata(&rel)
            .map_err(|e| ExportError::from_io(path, e))?;
        let kind = Kind::of(meta.file_type());
        Ok(Entry {
            name: path.to_owned(),
            kind,
            size: if kind == Kind::File { meta.len() } else { 0 },
            mtime: unix_secs(meta.modified().map(|t| t.into_std())),
        })
    }

    /// Lists the directory at `path` (the root if empty): names sorted, symlinks not followed,
    /// hidden entries left out unless shared.
    pub(crate) fn list(&self, path: &str) -> Result<Listing, ExportError> {
        let rel = self.checked(path)?;
        let sub = self
            .dir
            .open_dir(&rel)
            .map_err(|e| ExportError::from_io(path, e))?;
        let mut entries = Vec::new();
        let mut truncated = false;
        for item in sub.entries().map_err(|e| ExportError::from_io(path, e))? {
            let item = item.map_err(|e| ExportError::from_io(path, e))?;
            if entries.len() == MAX_LIST_ENTRIES {
                truncated = true;
                break;
            }
            let name = item.file_name().to_string_lossy().into_owned();
            if !self.show_hidden && is_hidden_name(&name) {
                continue;
            }
            // The entry may vanish between readdir and stat; list it as "other" then rather than
            // failing the whole listing.
            let (kind, size, mtime) = match item.metadata() {
                Ok(m) => {
                    let kind = Kind::of(m.file_type());
                    let size = if kind == Kind::File { m.len() } else { 0 };
                    (kind, size, unix_secs(m.modified().map(|t| t.into_std())))
                }
                Err(_) => (Kind::Other, 0, 0),
            };
            entries.push(Entry {
                name,
                kind,
                size,
                mtime,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Listing { entries, truncated })
    }

    /// Opens the regular file at `path` for reading and returns it with its size.
    ///
    /// Refuses anything that is not a regular file, both before and after opening.
    pub(crate) fn open_file(&self, path: &str) -> Result<OpenFile, ExportError> {
        let rel = self.checked(path)?;
        let refuse = |kind: Kind| match kind {
            Kind::File => Ok(()),
            Kind::Dir => Err(ExportError::IsDirectory {
                path: path.to_owned(),
            }),
            other => Err(ExportError::NotRegular {
                path: path.to_owned(),
                kind: other.describe(),
            }),
        };
        // First check: avoids even opening FIFOs and devices in the normal case.
        let meta = self
            .dir
            .metadata(&rel)
            .map_err(|e| ExportError::from_io(path, e))?;
        refuse(Kind::of(meta.file_type()))?;
        let mut opts = OpenOptions::new();
        opts.read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = self
            .dir
            .open_with(&rel, &opts)
            .map_err(|e| ExportError::from_io(path, e))?;
        // Second check, on the descriptor itself: the path may have been swapped meanwhile.
        let meta = file.metadata().map_err(|e| ExportError::from_io(path, e))?;
        refuse(Kind::of(meta.file_type()))?;
        let links = cap_std::fs::MetadataExt::nlink(&meta);
        if links > 1 && !self.allow_hard_links {
            return Err(ExportError::HardLinked {
                path: path.to_owned(),
                links,
            });
        }
        let file = file.into_std();
        // Before the stat: a change after this instant is stamped no earlier (see `digests`).
        let opened_at = SystemTime::now();
        let meta = file.metadata().map_err(|e| ExportError::from_io(path, e))?;
        let id = {
            use std::os::unix::fs::MetadataExt;
            FileId {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        };
        Ok(OpenFile {
            file: Arc::new(file),
            version: Version::of(&meta),
            path: path.to_owned(),
            id,
            opened_at,
            nowait: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
    }

    /// [`Root::open_file`] on the blocking pool. Cancel-safe (the result is just dropped).
    pub(crate) async fn open_file_async(&self, path: String) -> Result<OpenFile, ExportError> {
        let root = self.clone();
        run_blocking(&path.clone(), move || root.open_file(&path)).await
    }

    /// [`Root::stat`] on the blocking pool. Cancel-safe.
    pub(crate) async fn stat_async(&self, path: String) -> Result<Entry, ExportError> {
        let root = self.clone();
        run_blocking(&path.clone(), move || root.stat(&path)).await
    }

    /// [`Root::list`] on the blocking pool. Cancel-safe.
    pub(crate) async fn list_async(&self, path: String) -> Result<Listing, ExportError> {
        let root = self.clone();
        run_blocking(&path.clone(), move || root.list(&path)).await
    }
}

async fn run_blocking<T: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> Result<T, ExportError> + Send + 'static,
) -> Result<T, ExportError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(join) => Err(ExportError::Io {
            path: path.to_owned(),
            source: io::Error::other(format!("file system task failed: {join}")),
        }),
    }
}

/// What identifies one version of a file's content: size, modification time (to the
/// nanosecond) and change time. A write changes mtime and ctime even when the size stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    /// Size in bytes.
    pub(crate) size: u64,
    /// Modification time: seconds since the epoch and nanoseconds.
    pub(crate) mtime: (i64, u32),
    /// Change time (also moves on `touch -m` back to an old mtime).
    pub(crate) ctime: (i64, u32),
    /// Permission bits (`st_mode & 0o7777`).
    pub(crate) mode: u32,
}

impl Version {
    fn of(meta: &std::fs::Metadata) -> Version {
        use std::os::unix::fs::MetadataExt;
        let nanos = |n: i64| u32::try_from(n).unwrap_or(0);
        Version {
            size: meta.len(),
            mtime: (meta.mtime(), nanos(meta.mtime_nsec())),
            ctime: (meta.ctime(), nanos(meta.ctime_nsec())),
            mode: meta.mode() & 0o7777,
        }
    }

    /// What differs between `self` (before) and `now`, in words; `None` if nothing.
    pub(crate) fn changes(&self, now: &Version) -> Option<String> {
        if now.size != self.size {
            Some(format!(
                "its size went from {} to {} bytes",
                self.size, now.size
            ))
        } else if now.mtime != self.mtime || now.ctime != self.ctime {
            Some("it was modified".to_owned())
        } else {
            None
        }
    }
}

/// A regular file opened beneath the root. Cheap to clone; reads are positioned, so clones do
/// not share a cursor.
#[derive(Debug, Clone)]
pub(crate) struct OpenFile {
    file: Arc<std::fs::File>,
    version: Version,
    path: String,
    /// Device and inode.
    id: FileId,
    /// Just before the version was taken.
    opened_at: SystemTime,
    /// Whether reads without waiting (`RWF_NOWAIT`) are still worth trying on this file
    /// (cleared when the file system does not support them).
    nowait: Arc<std::sync::atomic::AtomicBool>,
}

/// How far [`OpenFile::read_cached`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Filled {
    /// Bytes read into the start of the buffer.
    pub(crate) len: usize,
    /// Whether the read is over: the buffer is full or the end of the file was reached. If
    /// not, the rest is not in the page cache (or the file system cannot tell).
    pub(crate) done: bool,
}

impl OpenFile {
    /// The file's size when it was opened.
    pub(crate) fn size(&self) -> u64 {
        self.version.size
    }

    /// The file's version when it was opened.
    pub(crate) fn version(&self) -> Version {
        self.version
    }

    /// Errors with [`ExportError::Changed`] if the open file is no longer the version that was
    /// opened (checked on the descriptor, so a rename or replacement of the path does not
    /// count: the bytes read are still the opened file's).
    pub(crate) fn check_unchanged(&self) -> Result<(), ExportError> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| ExportError::from_io(&self.path, e))?;
        match self.version.changes(&Version::of(&meta)) {
            None => Ok(()),
            Some(detail) => Err(ExportError::Changed {
                path: self.path.clone(),
                detail,
            }),
        }
    }

    /// The path as requested.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// Which file this is (device and inode).
    pub(crate) fn id(&self) -> FileId {
        self.id
    }

    /// When the file was opened, just before its version was taken.
    pub(crate) fn opened_at(&self) -> SystemTime {
        self.opened_at
    }

    fn check_offset(&self, offset: u64) -> Result<(), ExportError> {
        if offset > crate::proto::MAX_OFFSET {
            return Err(ExportError::BadOffset {
                path: self.path.clone(),
                offset,
            });
        }
        Ok(())
    }

    /// Reads up to `max` bytes at `offset` (fewer only at end of file; empty at or past it).
    #[cfg(test)]
    pub(crate) fn read_at(&self, offset: u64, max: usize) -> Result<Vec<u8>, ExportError> {
        let mut buf = vec![0u8; max];
        let filled = self.read_into(offset, &mut buf)?;
        buf.truncate(filled);
        Ok(buf)
    }

    /// Fills `buf` with the bytes at `offset`; returns how many (fewer than `buf.len()` only
    /// at end of file). Blocking.
    pub(crate) fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize, ExportError> {
        use std::os::unix::fs::FileExt;
        self.check_offset(offset)?;
        let mut filled = 0;
        // Bounded: each iteration either fills more of `buf` or ends the loop.
        while filled < buf.len() {
            match self
                .file
                .read_at(&mut buf[filled..], offset.saturating_add(filled as u64))
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ExportError::from_io(&self.path, e)),
            }
        }
        Ok(filled)
    }

    /// Reads into `buf` what the page cache holds of the bytes at `offset`, without waiting
    /// for the disk (`preadv2` with `RWF_NOWAIT`), so it may run on an async worker. Stops at
    /// the first byte that would need the disk (whose read the kernel then starts) and tells
    /// whether the read is over; on a file system without such reads, reads nothing.
    pub(crate) fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<Filled, ExportError> {
        use rustix::io::{Errno, IoSliceMut, ReadWriteFlags};
        use std::sync::atomic::Ordering;
        self.check_offset(offset)?;
        let mut len = 0;
        if !self.nowait.load(Ordering::Relaxed) {
            return Ok(Filled { len, done: false });
        }
        // Bounded: each iteration either fills more of `buf` or ends the loop.
        while len < buf.len() {
            let at = offset.saturating_add(len as u64);
            match rustix::io::preadv2(
                &*self.file,
                &mut [IoSliceMut::new(&mut buf[len..])],
                at,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => return Ok(Filled { len, done: true }),
                Ok(n) => len += n,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(Filled { len, done: false }),
                Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                    self.nowait.store(false, Ordering::Relaxed);
                    return Ok(Filled { len, done: false });
                }
                Err(e) => return Err(ExportError::from_io(&self.path, e.into())),
            }
        }
        Ok(Filled { len, done: true })
    }

    /// [`OpenFile::read_at`] on the blocking pool. Cancel-safe.
    #[cfg(test)]
    pub(crate) async fn read_chunk(&self, offset: u64) -> Result<Vec<u8>, ExportError> {
        let f = self.clone();
        run_blocking(&self.path, move || f.read_at(offset, CHUNK_SIZE)).await
    }

    /// Runs `f` with this file on the blocking pool. Cancel-safe (the result is dropped).
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&OpenFile) -> Result<T, ExportError> + Send + 'static,
    ) -> Result<T, ExportError> {
        let file = self.clone();
        run_blocking(&self.path, move || f(&file)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write as _;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    /// A root with `hello.txt`, `sub/inner.txt`, and a sibling directory `outside/secret.txt`.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(root.join("hello.txt"), b"hello world\n").unwrap();
        fs::write(root.join("sub/inner.txt"), b"inner").unwrap();
        fs::write(outside.join("secret.txt"), b"SECRET").unwrap();
        Fixture {
            _tmp: tmp,
            root,
            outside,
        }
    }

    fn read_all(f: &OpenFile) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = f.read_at(out.len() as u64, 4).unwrap();
            if chunk.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk);
        }
    }

    #[test]
    fn a_regular_file_inside_the_root_is_read_in_chunks() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        let f = root.open_file("hello.txt").unwrap();
        assert_eq!(f.size(), 12);
        assert_eq!(f.read_at(0, 5).unwrap(), b"hello");
        assert_eq!(f.read_at(6, 100).unwrap(), b"world\n");
        assert!(f.read_at(12, 100).unwrap().is_empty());
        assert_eq!(
            read_all(&root.open_file("sub/inner.txt").unwrap()),
            b"inner"
        );
    }

    #[test]
    fn dot_dot_that_stays_inside_is_allowed() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        let f = root.open_file("sub/../hello.txt").unwrap();
        assert_eq!(read_all(&f), b"hello world\n");
    }

    #[test]
    fn dot_dot_above_the_root_is_refused() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        for p in [
            "../outside/secret.txt",
            "sub/../../outside/secret.txt",
            "..",
        ] {
            let err = root.open_file(p).unwrap_err();
            assert!(matches!(err, ExportError::Escape { .. }), "{p}: {err:?}");
            assert!(err.to_string().contains("outside the exported directory"));
        }
        assert!(matches!(
            root.list("..").unwrap_err(),
            ExportError::Escape { .. }
        ));
    }

    #[test]
    fn absolute_paths_are_refused() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        let secret = fx.outside.join("secret.txt");
        let err = root.open_file(secret.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, ExportError::Absolute { .. }), "{err:?}");
        let err = root.stat("/etc/passwd").unwrap_err();
        assert!(matches!(err, ExportError::Absolute { .. }), "{err:?}");
    }

    #[test]
    fn a_symlink_to_a_file_outside_is_refused() {
        let fx = fixture();
        symlink(fx.outside.join("secret.txt"), fx.root.join("link")).unwrap();
        symlink("../outside/secret.txt", fx.root.join("rel-link")).unwrap();
        let root = Root::open(&fx.root).unwrap();
        for p in ["link", "rel-link"] {
            let err = root.open_file(p).unwrap_err();
            assert!(matches!(err, ExportError::Escape { .. }), "{p}: {err:?}");
        }
    }

    #[test]
    fn a_symlink_through_an_intermediate_directory_is_refused() {
        let fx = fixture();
        symlink(&fx.outside, fx.root.join("door")).unwrap();
        let root = Root::open(&fx.root).unwrap();
        let err = root.open_file("door/secret.txt").unwrap_err();
        assert!(matches!(err, ExportError::Escape { .. }), "{err:?}");
        let err = root.list("door").unwrap_err();
        assert!(matches!(err, ExportError::Escape { .. }), "{err:?}");
        let err = root.stat("door/secret.txt").unwrap_err();
        assert!(matches!(err, ExportError::Escape { .. }), "{err:?}");
    }

    #[test]
    fn a_symlink_that_stays_inside_is_followed() {
        let fx = fixture();
        symlink("sub/inner.txt", fx.root.join("alias")).unwrap();
        let root = Root::open(&fx.root).unwrap();
        assert_eq!(read_all(&root.open_file("alias").unwrap()), b"inner");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let fx = fixture();
        let status = std::process::Command::new("mkfifo")
            .arg(fx.root.join("pipe"))
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        let root = Root::open(&fx.root).unwrap();
        let err = root.open_file("pipe").unwrap_err();
        assert!(
            matches!(err, ExportError::NotRegular { kind: "fifo", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("only regular files are served"));
    }

    #[test]
    fn a_socket_is_refused() {
        let fx = fixture();
        let _l = std::os::unix::net::UnixListener::bind(fx.root.join("sock")).unwrap();
        let root = Root::open(&fx.root).unwrap();
        let err = root.open_file("sock").unwrap_err();
        assert!(
            matches!(err, ExportError::NotRegular { kind: "socket", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn device_file_types_are_classified_as_not_regular() {
        // Creating a device node needs privileges; classify the real /dev/null instead.
        let dev = Dir::open_ambient_dir("/dev", ambient_authority()).unwrap();
        let meta = dev.symlink_metadata("null").unwrap();
        assert_eq!(Kind::of(meta.file_type()), Kind::CharDevice);
        assert_eq!(Kind::CharDevice.describe(), "character device");
    }

    #[test]
    fn a_directory_is_refused_for_read_and_listed_for_ls() {
        let fx = fixture();
        symlink("sub", fx.root.join("sublink")).unwrap();
        let root = Root::open(&fx.root).unwrap();
        let err = root.open_file("sub").unwrap_err();
        assert!(matches!(err, ExportError::IsDirectory { .. }), "{err:?}");
        let listing = root.list("").unwrap();
        assert!(!listing.truncated);
        let got: Vec<_> = listing
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.kind, e.size))
            .collect();
        assert_eq!(
            got,
            vec![
                ("hello.txt", Kind::File, 12),
                ("sub", Kind::Dir, 0),
                ("sublink", Kind::Symlink, 0),
            ]
        );
        assert_eq!(root.list("sub").unwrap().entries.len(), 1);
        assert_eq!(root.list(".").unwrap().entries.len(), 3);
        let err = root.list("hello.txt").unwrap_err();
        assert!(matches!(err, ExportError::NotDirectory { .. }), "{err:?}");
    }

    #[test]
    fn missing_paths_are_reported_as_not_found() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        for err in [
            root.open_file("nope.txt").unwrap_err(),
            root.stat("sub/nope").unwrap_err(),
            root.list("nodir").unwrap_err(),
        ] {
            assert!(matches!(err, ExportError::NotFound { .. }), "{err:?}");
        }
    }

    #[test]
    fn stat_reports_kind_and_size() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        let e = root.stat("hello.txt").unwrap();
        assert_eq!((e.kind, e.size), (Kind::File, 12));
        assert_eq!(root.stat("sub").unwrap().kind, Kind::Dir);
        assert_eq!(root.stat("").unwrap().kind, Kind::Dir);
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_during_a_read_never_exposes_outside_files() {
        let fx = fixture();
        fs::write(fx.outside.join("inner.txt"), b"OUTSIDE").unwrap();
        let root = Root::open(&fx.root).unwrap();
        let f = root.open_file("sub/inner.txt").unwrap();
        assert_eq!(f.read_at(0, 2).unwrap(), b"in");
        // Swap the directory for a symlink to the outside mid-read.
        fs::rename(fx.root.join("sub"), fx.root.join("sub.old")).unwrap();
        symlink(&fx.outside, fx.root.join("sub")).unwrap();
        // The open descriptor still reads the original file.
        assert_eq!(f.read_at(2, 100).unwrap(), b"ner");
        // Any new access through the swapped path is refused.
        let err = root.open_file("sub/inner.txt").unwrap_err();
        assert!(matches!(err, ExportError::Escape { .. }), "{err:?}");
        let err = root.list("sub").unwrap_err();
        assert!(matches!(err, ExportError::Escape { .. }), "{err:?}");
    }

    #[test]
    fn the_root_itself_swapped_for_a_symlink_keeps_serving_the_original_directory() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        let moved = fx.root.with_file_name("moved");
        fs::rename(&fx.root, &moved).unwrap();
        symlink(&fx.outside, &fx.root).unwrap();
        assert!(matches!(
            root.open_file("secret.txt").unwrap_err(),
            ExportError::NotFound { .. }
        ));
        assert_eq!(
            read_all(&root.open_file("hello.txt").unwrap()),
            b"hello world\n"
        );
    }

    #[test]
    fn malformed_paths_are_refused_with_a_reason() {
        assert!(matches!(
            check_path("a\0b").unwrap_err(),
            ExportError::InvalidPath {
                reason: "contains a NUL byte",
                ..
            }
        ));
        let long = "a/".repeat(3000);
        let err = check_path(&long).unwrap_err();
        assert!(matches!(err, ExportError::InvalidPath { .. }));
        assert!(err.to_string().len() < 200, "error stays short: {err}");
        assert_eq!(check_path("").unwrap(), PathBuf::from("."));
        assert_eq!(check_path("./a/b").unwrap(), PathBuf::from("./a/b"));
    }

    #[test]
    fn hidden_files_are_neither_listed_nor_served_unless_shared() {
        let fx = fixture();
        fs::write(fx.root.join(".bashrc"), b"secret").unwrap();
        fs::create_dir(fx.root.join(".ssh")).unwrap();
        fs::write(fx.root.join(".ssh/id"), b"key").unwrap();
        symlink(".ssh/id", fx.root.join("innocent")).unwrap();
        let root = Root::open(&fx.root).unwrap();
        let names: Vec<_> = root
            .list("")
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["hello.txt", "innocent", "sub"]);
        for p in [".bashrc", ".ssh/id", "sub/../.ssh/id", "innocent"] {
            let err = root.open_file(p).unwrap_err();
            assert!(matches!(err, ExportError::Hidden { .. }), "{p}: {err:?}");
            assert!(err.to_string().contains("hidden"), "{err}");
        }
        assert!(matches!(
            root.list(".ssh").unwrap_err(),
            ExportError::Hidden { .. }
        ));
        assert!(matches!(
            root.stat(".bashrc").unwrap_err(),
            ExportError::Hidden { .. }
        ));
        // Opted in: all of it.
        let root = Root::open(&fx.root).unwrap().show_hidden(true);
        assert_eq!(root.list("").unwrap().entries.len(), 5);
        assert_eq!(read_all(&root.open_file(".ssh/id").unwrap()), b"key");
    }

    #[test]
    fn the_root_is_shown_as_an_absolute_path() {
        let fx = fixture();
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(&fx.root, &cwd);
        let root = Root::open(&rel).unwrap();
        assert!(
            root.display_path().is_absolute(),
            "{:?}",
            root.display_path()
        );
        assert_eq!(root.display_path(), fs::canonicalize(&fx.root).unwrap());
    }

    /// `target` relative to `base` (through `..` as needed).
    fn pathdiff(target: &Path, base: &Path) -> PathBuf {
        let (t, b): (Vec<_>, Vec<_>) = (target.components().collect(), base.components().collect());
        let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let mut out = PathBuf::new();
        for _ in common..b.len() {
            out.push("..");
        }
        for c in &t[common..] {
            out.push(c);
        }
        out
    }

    #[test]
    fn a_version_change_is_described() {
        let fx = fixture();
        let root = Root::open(&fx.root).unwrap();
        let f = root.open_file("hello.txt").unwrap();
        f.check_unchanged().unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(fx.root.join("hello.txt"))
            .unwrap()
            .write_all(b"more")
            .unwrap();
        let err = f.check_unchanged().unwrap_err();
        assert!(
            err.to_string()
                .contains("changed while it was being read (its size went from 12 to 16 bytes)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn async_reads_return_chunks_of_at_most_chunk_size() {
        let fx = fixture();
        let big: Vec<u8> = (0..CHUNK_SIZE * 2 + 10).map(|i| (i % 251) as u8).collect();
        fs::write(fx.root.join("big.bin"), &big).unwrap();
        let root = Root::open(&fx.root).unwrap();
        let f = root.open_file_async("big.bin".into()).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..10 {
            let chunk = f.read_chunk(got.len() as u64).await.unwrap();
            assert!(chunk.len() <= CHUNK_SIZE);
            if chunk.is_empty() {
                break;
            }
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, big);
    }
}
