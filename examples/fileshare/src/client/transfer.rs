//! The reader's side of a transfer: a file's chunks checked as they come (order, size, and
//! at the end the exporter's SHA-256), so a copy that is not exact is never taken for a good
//! one.

use std::time::Duration;

use futures::StreamExt as _;
use netchan_rpc::ResponseStream;

use super::CallError;
use crate::proto::{chunks, new_hasher, window_for_rtt, Chunk, DIGEST_LEN, READ_WINDOW_MIN};

/// Longest wait for the next chunk of a file (above the hub's own per-chunk bound).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// Rate one read should reach over a long link to the hub, in bytes per second: the reader's
/// window carries it over the round trip (1 Gbit/s, as the hub's default forward rate).
const READ_RATE: u64 = 125_000_000;

/// Largest window of a read's hop from the hub, whatever the round trip: what one read may
/// hold at the reader is bounded by 32 MiB of chunks.
const READ_WINDOW_MAX: u32 = chunks(32 << 20);

/// The stream window of a read from the hub over a link whose round trip is `rtt`: sized like
/// the hub's window to the exporter ([`window_for_rtt`] at [`READ_RATE`]), between
/// [`READ_WINDOW_MIN`] and [`READ_WINDOW_MAX`] chunks.
pub(crate) fn read_window(rtt: Duration) -> u32 {
    window_for_rtt(READ_RATE, rtt, READ_WINDOW_MIN).min(READ_WINDOW_MAX)
}

/// The chunks of one file, checked as they come: in order, within the announced size, and at
/// the end complete and matching the exporter's SHA-256.
pub(crate) struct FileStream {
    inner: ResponseStream<Chunk>,
    done: bool,
    check: Verifier,
}

/// The reader's check of a streamed file.
pub(crate) struct Verifier {
    next_offset: u64,
    size: Option<u64>,
    hasher: Option<ring::digest::Context>,
}

impl Verifier {
    /// For a stream from `offset`, the first `offset` bytes already fed into `prefix`.
    pub(crate) fn resume(offset: u64, prefix: ring::digest::Context) -> Verifier {
        Verifier {
            next_offset: offset,
            size: None,
            hasher: Some(prefix),
        }
    }

    /// Checks `chunk` against what came before; on the last one, checks size and digest.
    pub(crate) fn verify(&mut self, chunk: &Chunk) -> Result<(), CallError> {
        let corrupt = |detail: String| CallError::Corrupt { detail };
        let size = *self.size.get_or_insert(chunk.size);
        if chunk.size != size {
            return Err(corrupt(format!(
                "the announced size changed from {size} to {} bytes mid-transfer",
                chunk.size
            )));
        }
        if chunk.offset != self.next_offset {
            return Err(corrupt(format!(
                "a chunk for byte {} arrived where byte {} was due",
                chunk.offset, self.next_offset
            )));
        }
        let end = chunk.offset.saturating_add(chunk.data.len() as u64);
        if end > size {
            return Err(corrupt(format!(
                "{end} bytes arrived of a file announced as {size} bytes"
            )));
        }
        self.next_offset = end;
        let hasher = self.hasher.get_or_insert_with(new_hasher);
        hasher.update(&chunk.data);
        if chunk.eof {
            if end != size {
                return Err(corrupt(format!(
                    "the transfer ended at byte {end} of {size}"
                )));
            }
            let got = hasher.clone().finish();
            if chunk.sha256.len() != DIGEST_LEN {
                return Err(corrupt("the exporter sent no SHA-256".to_owned()));
            }
            if got.as_ref() != &chunk.sha256[..] {
                return Err(corrupt(
                    "SHA-256 mismatch: the bytes received differ from the exporter's file"
                        .to_owned(),
                ));
            }
        }
        Ok(())
    }
}

impl FileStream {
    /// The checked stream of a read from `offset`, the file's first `offset` bytes already fed
    /// into `prefix`.
    pub(super) fn new(
        inner: ResponseStream<Chunk>,
        offset: u64,
        prefix: ring::digest::Context,
    ) -> FileStream {
        FileStream {
            inner,
            done: false,
            check: Verifier::resume(offset, prefix),
        }
    }

    /// The next chunk, verified; `Ok(None)` after the last one. A stream that ends without
    /// its `eof` chunk is an error ([`CallError::CutShort`]); so is any mismatch
    /// ([`CallError::Corrupt`]). Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Option<Chunk>, CallError> {
        if self.done {
            return Ok(None);
        }
        let next = tokio::time::timeout(CHUNK_TIMEOUT, self.inner.next())
            .await
            .map_err(|_| {
                self.done = true;
                CallError::Stalled {
                    after: CHUNK_TIMEOUT,
                }
            })?;
        match next {
            Some(Ok(chunk)) => {
                self.done = chunk.eof;
                if let Err(e) = self.check.verify(&chunk) {
                    self.done = true;
                    return Err(e);
                }
                Ok(Some(chunk))
            }
            Some(Err(s)) => {
                self.done = true;
                Err(s.into())
            }
            None => {
                self.done = true;
                Err(CallError::CutShort)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use netchan_rpc::{ByteBuf, Context, Status};

    use super::*;
    use crate::export::{ExportService, Root, CHUNK_SIZE};
    use crate::proto::{Export as _, ReadReq};

    /// Every item of `export`'s read of `path` from `offset`, called directly (no hub).
    async fn read_items(root: &Root, path: &str, offset: u64) -> Vec<Result<Chunk, Status>> {
        let export = ExportService { root: root.clone() };
        let req = ReadReq {
            path: path.into(),
            offset,
        };
        match export.read(Context::detached("Export.read"), req).await {
            Ok(s) => s.collect().await,
            Err(e) => vec![Err(e)],
        }
    }

    fn sha256(bytes: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .to_vec()
    }

    #[tokio::test]
    async fn the_last_chunk_carries_the_whole_files_sha256_also_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE * 2 + 7).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let root = Root::open(dir.path()).unwrap();
        for offset in [0, 5, CHUNK_SIZE as u64 * 2 + 7, 1 << 40] {
            let items = read_items(&root, "f", offset).await;
            let chunks: Vec<Chunk> = items.into_iter().map(Result::unwrap).collect();
            let last = chunks.last().unwrap();
            assert!(last.eof, "offset {offset}");
            assert_eq!(&last.sha256[..], &sha256(&data)[..], "offset {offset}");
            assert!(chunks[..chunks.len() - 1]
                .iter()
                .all(|c| !c.eof && c.sha256.is_empty()));
            // The reader, given the prefix, accepts it; with a wrong prefix it does not.
            let start = offset.min(data.len() as u64) as usize;
            let mut prefix = new_hasher();
            prefix.update(&data[..start]);
            let mut v = Verifier::resume(offset, prefix);
            let ok = chunks.iter().try_for_each(|c| v.verify(c));
            assert_eq!(
                ok.is_ok(),
                offset <= data.len() as u64,
                "offset {offset}: {ok:?}"
            );
            if offset > 0 && offset <= data.len() as u64 {
                let mut wrong = new_hasher();
                wrong.update(&vec![0xAA; start]);
                let mut v = Verifier::resume(offset, wrong);
                let err = chunks.iter().try_for_each(|c| v.verify(c)).unwrap_err();
                assert!(err.to_string().contains("SHA-256 mismatch"), "{err}");
            }
        }
    }

    #[test]
    fn the_reader_refuses_gaps_short_ends_and_bad_digests() {
        let chunk = |offset: u64, data: &[u8], eof: bool, digest: &[u8]| Chunk {
            size: 6,
            offset,
            data: ByteBuf::from(data.to_vec()),
            eof,
            sha256: ByteBuf::from(digest.to_vec()),
            ..Chunk::default()
        };
        let good = sha256(b"abcdef");
        let mut v = Verifier::resume(0, new_hasher());
        v.verify(&chunk(0, b"abc", false, &[])).unwrap();
        v.verify(&chunk(3, b"def", true, &good)).unwrap();
        let cases = [
            (
                vec![chunk(0, b"abc", false, &[]), chunk(4, b"ef", true, &good)],
                "where byte 3 was due",
            ),
            (vec![chunk(0, b"abc", true, &good)], "ended at byte 3 of 6"),
            (vec![chunk(0, b"abcdeX", true, &good)], "SHA-256 mismatch"),
            (vec![chunk(0, b"abcdef", true, &[])], "no SHA-256"),
            (vec![chunk(0, b"abcdefg", true, &good)], "announced as 6"),
        ];
        for (chunks, want) in cases {
            let mut v = Verifier::resume(0, new_hasher());
            let err = chunks.iter().try_for_each(|c| v.verify(c)).unwrap_err();
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
        }
    }

    /// Issue 22: the reader's hop is sized from its round trip like the hub's hop to the
    /// exporter, within bounds.
    #[test]
    fn the_readers_window_follows_its_round_trip_within_bounds() {
        let window = |ms| read_window(Duration::from_millis(ms));
        // A LAN: 4 MiB of chunks.
        assert_eq!(window(0), chunks(4 << 20));
        assert_eq!(window(5), chunks(4 << 20));
        // 50 ms at 1 Gbit/s is 6.25 MB in flight: twice the chunks that hold it, for
        // half-window credit.
        let bdp = 6_250_000_u64.div_ceil(CHUNK_SIZE as u64) as u32;
        assert_eq!(window(50), 2 * bdp);
        // Beyond 32 MiB of chunks a long round trip gets no more.
        assert_eq!(window(200), chunks(32 << 20));
        assert_eq!(window(60_000), chunks(32 << 20));
    }
}
