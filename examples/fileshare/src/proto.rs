//! The two RPC services and their messages.
//!
//! Every client holds one mux session to the hub. On it:
//! - [`auth::CHANNEL`](crate::auth::CHANNEL): the hello exchange, first and alone;
//! - an [`rpc::Peer`](netchan_rpc::Peer) link (channel [`netchan_rpc::PEER_CHANNEL`] each
//!   way): the client calls the hub's [`Hub`] service (`Hub.publish`, `Hub.list`...), the hub
//!   calls the client's [`Export`] service back (`Export.ls`, `Export.stat`);
//! - [`EXPORT_CHANNEL`]: the hub reads the client's files (`Export.read`) over channels of
//!   their own, with their own message limit and stream window.
//!
//! A read of another peer's file is `Hub.read` from the reader, forwarded by the hub as
//! `Export.read` to the exporter over the exporter's own session, streamed back chunk by chunk
//! (rpc stream credits bound what is in flight on each hop). docs/protocol.md, Part 3, describes
//! all of it on the wire.

use netchan_rpc::{rpc_service, ByteBuf, Code, Context, ItemStream, Status};
use serde::{Deserialize, Serialize};

use std::time::Duration;

use crate::export::{ExportError, CHUNK_SIZE};

/// Mux channel the client listens on for the [`Export`] service the hub reads files with.
pub(crate) const EXPORT_CHANNEL: &str = "export";

/// Call metadata key under which the hub tells an exporter who is reading (the reader's
/// published name), on every forwarded `Export` call. Absent on the hub's own probes.
pub(crate) const READER_KEY: &str = "fileshare-reader";

/// The largest offset a read may start at, at the hub and at the exporter alike. `off_t` is
/// signed, so no file holds a byte at `i64::MAX` or beyond (and a read there cannot even
/// probe one byte): a read from there is refused as out of range.
pub(crate) const MAX_OFFSET: u64 = i64::MAX as u64 - 1;

/// The chunks of [`CHUNK_SIZE`] that hold `bytes` (at least one): windows are sized in bytes,
/// so that they keep their memory whatever the chunk size.
pub(crate) const fn chunks(bytes: usize) -> u32 {
    let n = bytes / CHUNK_SIZE;
    if n == 0 {
        1
    } else {
        n as u32
    }
}

/// Smallest window of a read's hop from the hub to the reader: 4 MiB of chunks, enough for a
/// LAN (more on a long link: `client::read_window`).
pub(crate) const READ_WINDOW_MIN: u32 = chunks(4 << 20);

/// The stream window, in chunks, that carries `rate` bytes per second over a hop whose round
/// trip is `rtt`: twice the bandwidth-delay product (credit comes back in half-window batches,
/// so only half a window is sure to be in flight), at least `floor` (and at least 1). Both
/// hops of a forwarded read size their windows this way: the hub's to the exporter, the
/// reader's to the hub.
pub(crate) fn window_for_rtt(rate: u64, rtt: Duration, floor: u32) -> u32 {
    let bdp = (rate as f64 * rtt.as_secs_f64() / CHUNK_SIZE as f64).ceil() as u64;
    let floor = u64::from(floor.max(1));
    bdp.saturating_mul(2).max(floor).min(u64::from(u32::MAX)) as u32
}

/// Length of [`Chunk::sha256`] on the last chunk.
pub(crate) const DIGEST_LEN: usize = 32;

/// A fresh SHA-256 context: the digest of [`Chunk::sha256`].
pub(crate) fn new_hasher() -> ring::digest::Context {
    ring::digest::Context::new(&ring::digest::SHA256)
}

/// The hub's answer to a call forwarded to an exporter that is gone (its session ended, it
/// left mid-transfer, or no channel to it could be opened): `Unavailable`, naming the peer.
///
/// The wire has only a code and a message, so the code carries the meaning: the hub answers
/// `Unavailable` for nothing but a gone peer (and for a call on its own connection while that
/// connection ends, an answer that never arrives). A client tells this from a lost link to
/// the hub with [`Status::is_conn_lost`], set only on the status its own rpc layer makes when
/// the link broke and never sent; [`is_peer_gone`] is that test. No message is parsed.
pub(crate) fn peer_gone(name: &str, detail: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("peer gone: {name:?} disconnected ({detail})"))
}

/// The hub's answer to a call it routed to the hub holding peer `name` when that hub is gone
/// (its session ended mid-call, or it cannot be reached): `Unavailable`, like [`peer_gone`],
/// so a client resumes the same way.
pub(crate) fn hub_gone(name: &str, detail: impl std::fmt::Display) -> Status {
    Status::unavailable(format!(
        "peer gone: the hub holding {name:?} is gone ({detail})"
    ))
}

/// Whether `s` is the hub's [`peer_gone`] answer (not a lost link to the hub).
pub(crate) fn is_peer_gone(s: &Status) -> bool {
    s.code() == Code::Unavailable && !s.is_conn_lost()
}

/// The hub's service, called by clients over their peer link. The caller is identified by the
/// connection the call arrives on, never by a name in the request.
#[rpc_service]
pub(crate) trait Hub {
    /// Publishes the calling connection under `name`, after which the hub calls the
    /// caller's [`Export`] service. Once per connection.
    async fn publish(&self, ctx: Context, req: PublishReq) -> Result<PublishResp, Status>;
    /// Names of the published peers, sorted. Like `ls`, `stat` and `read`, only for a
    /// connection that has published (else `FailedPrecondition` "publish first").
    async fn list(&self, ctx: Context, req: ListReq) -> Result<Vec<String>, Status>;
    /// Lists a directory of a peer.
    async fn ls(&self, ctx: Context, req: PeerPath) -> Result<Listing, Status>;
    /// Describes a path of a peer.
    async fn stat(&self, ctx: Context, req: PeerPath) -> Result<Entry, Status>;
    /// Streams a file of a peer, from `offset`.
    async fn read(&self, ctx: Context, req: PeerRead) -> Result<ItemStream<Chunk>, Status>;
}

/// The hub-to-hub service, served on a hub's fleet listener to the other hubs of the fleet
/// (never to clients): a hub forwards `Hub.ls`/`stat`/`read` of a peer another hub holds as
/// these calls to that hub, which serves them exactly as its own `Hub` calls (slots,
/// fairness, windows and the exporter's checks apply there). Same answers and codes as
/// [`Hub`]; `reader` names the reader (`alice@hub-a`) for slots and logs.
#[rpc_service]
pub(crate) trait Relay {
    /// `Hub.ls` of a peer held by the called hub.
    async fn ls(&self, ctx: Context, req: RelayPath) -> Result<Listing, Status>;
    /// `Hub.stat` of a peer held by the called hub.
    async fn stat(&self, ctx: Context, req: RelayPath) -> Result<Entry, Status>;
    /// `Hub.read` of a peer held by the called hub.
    async fn read(&self, ctx: Context, req: RelayRead) -> Result<ItemStream<Chunk>, Status>;
}

/// What every client exports to the hub, over its peer link (`ls`, `stat`) and on
/// [`EXPORT_CHANNEL`] (reads): read-only access to its root directory.
#[rpc_service]
pub(crate) trait Export {
    /// Lists a directory ("" for the root).
    async fn ls(&self, ctx: Context, req: String) -> Result<Listing, Status>;
    /// Describes a path.
    async fn stat(&self, ctx: Context, req: String) -> Result<Entry, Status>;
    /// Streams a regular file from `offset`, in chunks, the last one marked `eof`.
    async fn read(&self, ctx: Context, req: ReadReq) -> Result<ItemStream<Chunk>, Status>;
}

/// What kind of object a directory entry or path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Kind {
    /// A regular file (the only kind that can be read).
    File,
    /// A directory.
    Dir,
    /// A symbolic link (listed, not followed, by `ls`).
    Symlink,
    /// A FIFO.
    Fifo,
    /// A socket.
    Socket,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// Anything else.
    Other,
}

impl Kind {
    /// A human name for the kind, used in errors.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Dir => "directory",
            Kind::Symlink => "symbolic link",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Other => "special file",
        }
    }
}

/// One directory entry or the result of a stat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Entry {
    /// The entry's name (lossily converted to UTF-8).
    pub(crate) name: String,
    /// What it is.
    pub(crate) kind: Kind,
    /// Size in bytes (0 for directories and special files).
    pub(crate) size: u64,
    /// Last modification, in seconds since the Unix epoch (0 if unknown).
    pub(crate) mtime: i64,
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Listing {
    /// Entries sorted by name.
    pub(crate) entries: Vec<Entry>,
    /// True if the directory had more than [`MAX_LIST_ENTRIES`](crate::export::MAX_LIST_ENTRIES) entries.
    pub(crate) truncated: bool,
}

/// `Hub.publish` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PublishReq {
    /// The name to publish under.
    pub(crate) name: String,
}

/// `Hub.publish` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PublishResp {
    /// The name now published.
    pub(crate) name: String,
    /// How many peers are published, this one included.
    pub(crate) peers: u32,
}

/// `Hub.list` request (empty; a struct so fields can be added).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ListReq {}

/// A path on a named peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeerPath {
    /// The peer's published name.
    pub(crate) peer: String,
    /// Path relative to the peer's root.
    pub(crate) path: String,
}

/// `Hub.read` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeerRead {
    /// The peer's published name.
    pub(crate) peer: String,
    /// Path relative to the peer's root.
    pub(crate) path: String,
    /// Where to start, in bytes.
    pub(crate) offset: u64,
}

/// `Relay.ls` and `Relay.stat` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RelayPath {
    /// Who reads, as `NAME@HUB`.
    pub(crate) reader: String,
    /// The peer's published name.
    pub(crate) peer: String,
    /// Path relative to the peer's root.
    pub(crate) path: String,
}

/// `Relay.read` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RelayRead {
    /// Who reads, as `NAME@HUB`.
    pub(crate) reader: String,
    /// The peer's published name.
    pub(crate) peer: String,
    /// Path relative to the peer's root.
    pub(crate) path: String,
    /// Where to start, in bytes.
    pub(crate) offset: u64,
}

/// `Export.read` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReadReq {
    /// Path relative to the root.
    pub(crate) path: String,
    /// Where to start, in bytes.
    pub(crate) offset: u64,
}

/// One piece of a streamed file.
///
/// Every chunk announces the version of the file being sent (`size`, `mtime`, `mode`); the
/// last one (`eof`) also carries the SHA-256 of the whole file, `[0, size)`, computed by the
/// exporter from the bytes it read. The reader checks offsets, the total and the digest, so a
/// copy that is not exact is never taken for a good one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Chunk {
    /// The file's size when it was opened: exactly what the transfer delivers, up to the end.
    pub(crate) size: u64,
    /// Offset of `data` in the file.
    pub(crate) offset: u64,
    /// The bytes (at most [`CHUNK_SIZE`]); a `ByteBuf` travels as
    /// one block, shared with the received frame and sent without a copy.
    pub(crate) data: ByteBuf,
    /// True on the last chunk. A stream that ends without it was cut short.
    pub(crate) eof: bool,
    /// The file's modification time when it was opened: seconds since the Unix epoch.
    pub(crate) mtime: i64,
    /// Nanoseconds part of `mtime`.
    pub(crate) mtime_nanos: u32,
    /// The file's permission bits (`st_mode & 0o7777`).
    pub(crate) mode: u32,
    /// On the `eof` chunk: SHA-256 of the whole file (32 bytes). Empty on every other chunk.
    pub(crate) sha256: ByteBuf,
}

impl From<ExportError> for Status {
    fn from(e: ExportError) -> Status {
        let code = match &e {
            ExportError::Absolute { .. }
            | ExportError::Escape { .. }
            | ExportError::PermissionDenied { .. }
            | ExportError::HardLinked { .. } => Code::PermissionDenied,
            ExportError::BadOffset { .. } => Code::OutOfRange,
            ExportError::InvalidPath { .. } => Code::InvalidArgument,
            ExportError::NotFound { .. } => Code::NotFound,
            ExportError::Hidden { .. } => Code::PermissionDenied,
            ExportError::IsDirectory { .. }
            | ExportError::NotDirectory { .. }
            | ExportError::NotRegular { .. } => Code::FailedPrecondition,
            ExportError::Changed { .. } => Code::Aborted,
            ExportError::Io { .. } => Code::Internal,
        };
        // The io source is part of the message: the status travels as text.
        let msg = match &e {
            ExportError::Io { source, .. } => format!("{e}: {source}"),
            _ => e.to_string(),
        };
        Status::new(code, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_errors_map_to_precise_status_codes() {
        let s: Status = ExportError::Escape { path: "x".into() }.into();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("outside the exported directory"));
        let s: Status = ExportError::NotFound { path: "x".into() }.into();
        assert_eq!(s.code(), Code::NotFound);
        let s: Status = ExportError::Io {
            path: "x".into(),
            source: std::io::Error::other("disk on fire"),
        }
        .into();
        assert!(s.message().contains("disk on fire"), "{s}");
    }
}
