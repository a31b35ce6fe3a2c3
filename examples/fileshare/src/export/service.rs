//! The exported service: [`Export`] over a [`Root`], read-only, one chunk read per credit the
//! hub grants, each read's last chunk carrying the SHA-256 of the whole file.

use netchan_rpc::{self as rpc, ByteBuf, Context, ItemStream, Status};
use tracing::debug;

use super::digests::Digest;
use super::{ExportError, OpenFile, Root, CHUNK_SIZE};
use crate::proto::{new_hasher, Chunk, Entry, Export, Listing, ReadReq, DIGEST_LEN, READER_KEY};

/// The rpc server of [`Export`] over `root`, for the peer link and the reads channels.
pub(crate) fn export_server(root: Root) -> rpc::Server {
    // The hub forwards at most --max-reads-per-peer calls at once; this is a backstop.
    let mut server = rpc::Server::with_config(rpc::Config::default().max_in_flight(64));
    server.add(ExportService { root }.into_service());
    server
}

/// The exported service: read-only access to the root (see [`crate::export`]).
pub(crate) struct ExportService {
    /// The confined root.
    pub(crate) root: Root,
}

/// Who is calling, as the hub names the reader (`a peer` when it does not say).
fn reader_of(ctx: &Context) -> String {
    ctx.metadata()
        .get(READER_KEY)
        .map_or_else(|| "a peer".to_owned(), |r| format!("{r:?}"))
}

/// How [`ExportService::read`] walks one file: one chunk per poll; the SHA-256 of the whole
/// file on the last one, from the exporter's digests if this version was read whole before,
/// else computed along the read (first over the prefix before `offset`, for a resumed read).
struct ReadState {
    root: Root,
    file: OpenFile,
    offset: u64,
    start: u64,
    /// The whole file's digest, known before the read ends (from the exporter's digests).
    known: Option<Digest>,
    hasher: Option<ring::digest::Context>,
    done: bool,
}

impl ReadState {
    /// The next chunk. Reads on this thread what the page cache holds and the rest on the
    /// blocking pool, checks at the end that the file is still the version it was when
    /// opened, and unless the digest is known hashes the chunk here, in slices.
    async fn step(&mut self) -> Result<Chunk, ExportError> {
        let offset = self.offset;
        let v = self.file.version();
        let want = v.size.saturating_sub(offset).min(CHUNK_SIZE as u64) as usize;
        // Past the end a probe read still runs: it errors on an absurd offset and tells a
        // grown file from an unchanged one.
        let len = want.max(usize::from(offset >= v.size));
        let eof = offset.saturating_add(want as u64) >= v.size;
        // A new buffer for each chunk: one taken back from the rpc layer once sent was
        // measured slower, its memory being cold in this core's cache.
        let buf = vec![0u8; len];
        let (buf, got, digest) = match self.known {
            Some(digest) => {
                let (buf, got) = self.fill(buf, offset, len, eof).await?;
                (buf, got, eof.then_some(digest))
            }
            None => {
                let mut hasher = match self.hasher.take() {
                    Some(h) => h,
                    None => {
                        // A resumed read hashes the prefix first (long: blocking pool).
                        let start = self.start;
                        self.file
                            .blocking(move |f| {
                                let mut h = new_hasher();
                                if start > 0 {
                                    hash_prefix(f, start.min(f.size()), &mut h)?;
                                }
                                Ok(h)
                            })
                            .await?
                    }
                };
                let (buf, got) = self.fill(buf, offset, len, eof).await?;
                hash_in_slices(&mut hasher, &buf[..got.min(want)]).await;
                let digest = (eof && got == want).then(|| {
                    let mut d: Digest = [0; DIGEST_LEN];
                    d.copy_from_slice(hasher.clone().finish().as_ref());
                    d
                });
                self.hasher = Some(hasher);
                if let Some(d) = digest {
                    let kept =
                        self.root
                            .digests()
                            .insert(self.file.id(), &v, self.file.opened_at(), d);
                    debug!(path = %self.file.path(), kept, "hashed a whole file");
                }
                (buf, got, digest)
            }
        };
        if got != want {
            return Err(ExportError::Changed {
                path: self.file.path().to_owned(),
                detail: format!("{got} bytes at offset {offset} where {want} were expected"),
            });
        }
        let mut data = buf;
        data.truncate(want);
        self.offset = offset.saturating_add(want as u64);
        self.done = eof;
        Ok(Chunk {
            size: v.size,
            offset,
            data: ByteBuf::from(data),
            eof,
            mtime: v.mtime.0,
            mtime_nanos: v.mtime.1,
            mode: v.mode,
            sha256: digest.map_or_else(ByteBuf::default, |d| ByteBuf::from(d.to_vec())),
        })
    }

    /// Reads `len` bytes at `offset` into `buf`: on this thread what the page cache holds,
    /// the rest on the blocking pool (with, on the last chunk, the check that the file did not
    /// change).
    async fn fill(
        &self,
        mut buf: Vec<u8>,
        offset: u64,
        len: usize,
        eof: bool,
    ) -> Result<(Vec<u8>, usize), ExportError> {
        let cached = self.file.read_cached(offset, &mut buf[..len])?;
        if cached.done && !eof {
            return Ok((buf, cached.len));
        }
        self.file
            .blocking(move |f| {
                let mut got = cached.len;
                if !cached.done {
                    got += f.read_into(offset.saturating_add(got as u64), &mut buf[got..len])?;
                }
                if eof {
                    f.check_unchanged()?;
                }
                Ok((buf, got))
            })
            .await
    }
}

/// Most bytes hashed in one poll: about 50 µs of SHA-256, so that hashing on an async worker
/// never holds it long.
const HASH_SLICE: usize = 64 * 1024;

/// Feeds `data` into `hasher` on this thread, yielding to the runtime between slices of
/// [`HASH_SLICE`] bytes.
async fn hash_in_slices(hasher: &mut ring::digest::Context, data: &[u8]) {
    let mut slices = data.chunks(HASH_SLICE).peekable();
    // Bounded by the data's length.
    while let Some(slice) = slices.next() {
        hasher.update(slice);
        if slices.peek().is_some() {
            tokio::task::yield_now().await;
        }
    }
}

/// Feeds `[0, len)` of `f` into `hasher`, chunk by chunk.
fn hash_prefix(
    f: &OpenFile,
    len: u64,
    hasher: &mut ring::digest::Context,
) -> Result<(), ExportError> {
    let mut buf = vec![0u8; len.min(CHUNK_SIZE as u64) as usize];
    let mut at = 0;
    // Bounded by `len`: every iteration advances by a full buffer or fails.
    while at < len {
        let want = (len - at).min(buf.len() as u64) as usize;
        let got = f.read_into(at, &mut buf[..want])?;
        if got != want {
            return Err(ExportError::Changed {
                path: f.path().to_owned(),
                detail: "it shrank".to_owned(),
            });
        }
        hasher.update(&buf[..want]);
        at += want as u64;
    }
    Ok(())
}

impl Export for ExportService {
    async fn ls(&self, ctx: Context, req: String) -> Result<Listing, Status> {
        self.root.log_access(
            &reader_of(&ctx),
            format_args!("listed /{}", req.trim_start_matches('/')),
        );
        Ok(self.root.list_async(req).await?)
    }

    async fn stat(&self, ctx: Context, req: String) -> Result<Entry, Status> {
        // The hub's own liveness probe carries no reader and is not an access.
        if ctx.metadata().get(READER_KEY).is_some() {
            self.root
                .log_access(&reader_of(&ctx), format_args!("looked up {req}"));
        }
        Ok(self.root.stat_async(req).await?)
    }

    async fn read(&self, ctx: Context, req: ReadReq) -> Result<ItemStream<Chunk>, Status> {
        let reader = reader_of(&ctx);
        let file = match self.root.open_file_async(req.path.clone()).await {
            Ok(file) => file,
            Err(e) => {
                self.root
                    .log_access(&reader, format_args!("was refused {}: {e}", req.path));
                return Err(e.into());
            }
        };
        let from = if req.offset > 0 {
            format!(" from byte {}", req.offset)
        } else {
            String::new()
        };
        self.root.log_access(
            &reader,
            format_args!("reads {} ({} bytes){from}", req.path, file.size()),
        );
        let known = self.root.digests().get(file.id(), &file.version());
        debug!(
            path = %req.path,
            size = file.size(),
            offset = req.offset,
            digest_known = known.is_some(),
            "serving read"
        );
        let state = ReadState {
            root: self.root.clone(),
            file,
            offset: req.offset,
            start: req.offset,
            known,
            hasher: None,
            done: false,
        };
        // One chunk is read per poll, i.e. only when the hub's credit allows another item.
        let chunks = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            match st.step().await {
                Ok(chunk) => Some((Ok(chunk), st)),
                Err(e) => {
                    st.done = true;
                    Some((Err(Status::from(e)), st))
                }
            }
        });
        Ok(Box::pin(chunks))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt as _;
    use netchan_rpc::Code;

    use super::*;

    #[tokio::test]
    async fn a_file_that_changes_during_a_read_is_an_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; CHUNK_SIZE * 3]).unwrap();
        let root = Root::open(dir.path()).unwrap();
        for change in ["grow", "shrink", "rewrite"] {
            std::fs::write(&path, vec![1u8; CHUNK_SIZE * 3]).unwrap();
            // An old mtime, so that the rewrite below moves it whatever the clock's grain.
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000))
                .unwrap();
            let export = ExportService { root: root.clone() };
            let req = ReadReq {
                path: "f".into(),
                offset: 0,
            };
            let mut s = export
                .read(Context::detached("Export.read"), req)
                .await
                .unwrap();
            s.next().await.unwrap().unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            match change {
                "grow" => f.set_len(CHUNK_SIZE as u64 * 4).unwrap(),
                "shrink" => f.set_len(CHUNK_SIZE as u64).unwrap(),
                _ => {
                    use std::os::unix::fs::FileExt;
                    // Same size, new content, a new mtime.
                    f.write_at(b"X", 0).unwrap();
                }
            }
            let rest: Vec<_> = s.collect().await;
            let err = rest
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_else(|| panic!("{change}: no error"));
            assert_eq!(err.code(), Code::Aborted, "{change}: {err}");
            assert!(
                err.message().contains("changed while it was being read"),
                "{change}: {err}"
            );
        }
    }

    /// Every item of a read of `path` from `offset` through `root`.
    async fn read_all(root: &Root, path: &str, offset: u64) -> Vec<Chunk> {
        let export = ExportService { root: root.clone() };
        let req = ReadReq {
            path: path.into(),
            offset,
        };
        export
            .read(Context::detached("Export.read"), req)
            .await
            .unwrap()
            .map(|c| c.expect("a chunk"))
            .collect()
            .await
    }

    fn sha256(bytes: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .to_vec()
    }

    /// Issue 22: a file read whole is not hashed again for the same version: the next read
    /// (whole or resumed) sends the kept digest, and the bytes are the file's.
    #[tokio::test]
    async fn a_file_read_whole_is_not_hashed_again_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE * 2 + 3).map(|i| (i % 249) as u8).collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let root = Root::open(dir.path())
            .unwrap()
            .digest_settle(Duration::ZERO);
        let chunks = read_all(&root, "f", 0).await;
        assert_eq!(&chunks.last().unwrap().sha256[..], &sha256(&data)[..]);
        assert_eq!(root.digests().len(), 1);
        // Which digest the next reads send: a marked one put in its place.
        let f = root.open_file("f").unwrap();
        root.digests()
            .put_for_test(f.id(), f.version(), [0xEE; DIGEST_LEN]);
        for offset in [0, 5, CHUNK_SIZE as u64 * 2 + 3] {
            let chunks = read_all(&root, "f", offset).await;
            let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
            assert_eq!(bytes, data[offset as usize..], "offset {offset}");
            let last = chunks.last().unwrap();
            assert!(last.eof);
            assert_eq!(&last.sha256[..], &[0xEE; DIGEST_LEN], "offset {offset}");
        }
        // Another version (grown): hashed again, from its bytes.
        let mut longer = data.clone();
        longer.extend_from_slice(b"more");
        std::fs::write(dir.path().join("f"), &longer).unwrap();
        let chunks = read_all(&root, "f", 7).await;
        assert_eq!(&chunks.last().unwrap().sha256[..], &sha256(&longer)[..]);
    }

    /// Issue 22: a file changed just before its read may change again within the same
    /// timestamp, so its digest is not kept.
    #[tokio::test]
    async fn a_file_changed_just_before_its_read_keeps_no_digest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![3u8; 1000]).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let chunks = read_all(&root, "f", 0).await;
        assert_eq!(
            &chunks.last().unwrap().sha256[..],
            &sha256(&[3u8; 1000])[..]
        );
        assert_eq!(root.digests().len(), 0);
    }

    /// Issue 22: 2^63 − 1 is out of range at the exporter too (it used to reach the system
    /// call and fail as an i/o error), as are the offsets above it; the one below reads as
    /// the end of the file.
    #[tokio::test]
    async fn offsets_from_2_63_minus_1_are_out_of_range_at_the_exporter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let export = ExportService {
            root: Root::open(dir.path()).unwrap(),
        };
        for offset in [i64::MAX as u64, 1 << 63, u64::MAX] {
            let req = ReadReq {
                path: "f".into(),
                offset,
            };
            let items: Vec<_> = export
                .read(Context::detached("Export.read"), req)
                .await
                .unwrap()
                .collect()
                .await;
            assert_eq!(items.len(), 1, "offset {offset}");
            let err = items[0].as_ref().expect_err("out of range");
            assert_eq!(err.code(), Code::OutOfRange, "{offset}: {err}");
            assert!(err.message().contains(&offset.to_string()), "{err}");
        }
        let req = ReadReq {
            path: "f".into(),
            offset: crate::proto::MAX_OFFSET,
        };
        let items: Vec<_> = export
            .read(Context::detached("Export.read"), req)
            .await
            .unwrap()
            .collect()
            .await;
        let last = items[0].as_ref().expect("the end of the file");
        assert!(last.eof && last.data.is_empty(), "{last:?}");
    }
}
