//! The exported service: [`Export`] over a [`Root`], read-only, one chunk read per credit the
//! hub grants, each read's last chunk carrying the SHA-256 of the whole file.

use netchan_rpc::{self as rpc, ByteBuf, Context, ItemStream, Status};
use tracing::debug;

use super::{ExportError, OpenFile, Root, CHUNK_SIZE};
use crate::proto::{new_hasher, Chunk, Entry, Export, Listing, ReadReq, READER_KEY};

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

/// How [`ExportService::read`] walks one file: hash the prefix before `offset` (for a
/// resumed read, so that the final digest covers the whole file), then one chunk per poll.
struct ReadState {
    file: OpenFile,
    offset: u64,
    start: u64,
    hasher: Option<ring::digest::Context>,
    done: bool,
}

impl ReadState {
    /// The next chunk, on the blocking pool: reads, hashes and, at the end, checks that the
    /// file is still the version it was when opened.
    async fn step(&mut self) -> Result<Chunk, ExportError> {
        let (offset, start) = (self.offset, self.start);
        let mut hasher = self.hasher.take().unwrap_or_else(new_hasher);
        let (chunk, hasher) = self
            .file
            .blocking(move |f| {
                let v = f.version();
                if offset == start && start > 0 {
                    hash_prefix(f, start.min(v.size), &mut hasher)?;
                }
                let changed = |detail: String| ExportError::Changed {
                    path: f.path().to_owned(),
                    detail,
                };
                let want = v.size.saturating_sub(offset).min(CHUNK_SIZE as u64) as usize;
                // Past the end a probe read still runs: it errors on an absurd offset and
                // tells a grown file from an unchanged one.
                let data = f.read_at(offset, want.max(usize::from(offset >= v.size)))?;
                if data.len() != want {
                    return Err(changed(format!(
                        "{} bytes at offset {offset} where {want} were expected",
                        data.len()
                    )));
                }
                hasher.update(&data);
                let eof = offset.saturating_add(want as u64) >= v.size;
                let sha256 = if eof {
                    f.check_unchanged()?;
                    ByteBuf::from(hasher.clone().finish().as_ref().to_vec())
                } else {
                    ByteBuf::default()
                };
                let chunk = Chunk {
                    size: v.size,
                    offset,
                    data: ByteBuf::from(data),
                    eof,
                    mtime: v.mtime.0,
                    mtime_nanos: v.mtime.1,
                    mode: v.mode,
                    sha256,
                };
                Ok((chunk, hasher))
            })
            .await?;
        self.hasher = Some(hasher);
        self.offset = offset.saturating_add(chunk.data.len() as u64);
        self.done = chunk.eof;
        Ok(chunk)
    }
}

/// Feeds `[0, len)` of `f` into `hasher`, chunk by chunk.
fn hash_prefix(
    f: &OpenFile,
    len: u64,
    hasher: &mut ring::digest::Context,
) -> Result<(), ExportError> {
    let mut at = 0;
    // Bounded by `len`: every iteration advances by a full chunk or fails.
    while at < len {
        let want = (len - at).min(CHUNK_SIZE as u64) as usize;
        let data = f.read_at(at, want)?;
        if data.len() != want {
            return Err(ExportError::Changed {
                path: f.path().to_owned(),
                detail: "it shrank".to_owned(),
            });
        }
        hasher.update(&data);
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
        debug!(path = %req.path, size = file.size(), offset = req.offset, "serving read");
        let state = ReadState {
            file,
            offset: req.offset,
            start: req.offset,
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
