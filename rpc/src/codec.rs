//! Serialization: the only module that knows the wire codec is bincode.
//!
//! Everything on the wire that is not the raw length prefix or the preamble
//! goes through [`encode`] and [`decode`]: the envelope headers and the
//! payloads (user requests, responses and stream items). Swapping the codec
//! means rewriting this file (and Part 2 of `docs/protocol.md`).
//!
//! The format is bincode 2's `standard()` configuration (little-endian,
//! variable-length integers) driven through serde, with a fixed decode
//! limit: a length field inside a message claiming more than
//! [`DECODE_LIMIT`] bytes is an error before anything is allocated.

use std::{cell::RefCell, io};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::wire::Header;

/// Upper bound on the bytes one decode may claim (read plus allocate). It is
/// four times [`MAX_MESSAGE_SIZE_CAP`](crate::config::MAX_MESSAGE_SIZE_CAP)
/// because bincode claims `len * size_of::<T>()` up front for a `Vec<T>`,
/// which exceeds the encoded size when elements are varint-compressed.
pub(crate) const DECODE_LIMIT: usize = 256 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Encoding `what` failed (a `Serialize` impl errored, or the writer
    /// refused more bytes because the message grew past its limit).
    #[error("could not encode {what}: {error}")]
    Encode {
        /// What was being encoded ("request", "response", "envelope", ...).
        what: &'static str,
        /// The codec's error (shown in the message, so not also a `source`).
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Decoding `what` failed: truncated, invalid or over-limit data.
    #[error("could not decode {what}: {error}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The codec's error (shown in the message, so not also a `source`).
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `what` decoded but left unread bytes: the peer used another type.
    #[error("{what} has {extra} trailing bytes after a complete value")]
    TrailingBytes {
        /// What was being decoded.
        what: &'static str,
        /// Unread bytes.
        extra: usize,
    },
}

/// Appends the encoding of `value` to `out`.
pub(crate) fn encode<T, W>(out: &mut W, value: &T, what: &'static str) -> Result<(), CodecError>
where
    T: Serialize + ?Sized,
    W: io::Write,
{
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode {
            what,
            error: Box::new(e),
        })
}

/// Blocks at least this large are offered to the outbox to be queued by
/// reference instead of copied (see [`with_offered`]).
pub(crate) const ZERO_COPY_MIN: usize = 32 << 10;

/// Most bytes of an envelope header encoded on the stack (see
/// [`encode_header`]); a larger one (long metadata) is encoded in place.
const HEADER_ON_STACK: usize = 128;

/// Appends the encoding of a frame's envelope `header` in one write: encoded
/// on the stack first, so the writer's per-write bookkeeping runs once rather
/// than for each of its fields.
pub(crate) fn encode_header<W: io::Write>(
    out: &mut W,
    header: &Header<'_>,
    what: &'static str,
) -> Result<(), CodecError> {
    let mut buf = [0u8; HEADER_ON_STACK];
    match bincode::serde::encode_into_slice(header, &mut buf, config()) {
        Ok(n) => out
            .write_all(&buf[..n])
            .map_err(|inner| CodecError::Encode {
                what,
                error: Box::new(bincode::error::EncodeError::Io { inner, index: 0 }),
            }),
        Err(bincode::error::EncodeError::UnexpectedEnd) => encode(out, header, what),
        Err(e) => Err(CodecError::Encode {
            what,
            error: Box::new(e),
        }),
    }
}

/// Decodes one value from the front of `bytes` (it may borrow from them),
/// returning it and the number of bytes it used.
pub(crate) fn decode_prefix<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
    what: &'static str,
) -> Result<(T, usize), CodecError> {
    bincode::serde::borrow_decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode {
        what,
        error: Box::new(e),
    })
}

/// Decodes one value that must span all of `bytes` (payloads use
/// [`decode_payload`]).
#[cfg(test)]
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, CodecError> {
    let (value, used) = decode_prefix(bytes, what)?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes {
            what,
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

thread_local! {
    /// The buffer a payload is being decoded from, so that
    /// [`ByteBuf`](crate::ByteBuf) can share it instead of copying.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

thread_local! {
    /// A large byte block being encoded, offered to the outbox so it can be
    /// queued by reference instead of copied.
    static OFFER: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `serialize` (which writes `bytes` as one block) with `bytes`
/// offered for zero-copy queueing; see [`take_offered`]. A block under
/// [`ZERO_COPY_MIN`] is copied anyway, so it is not offered (no thread-local
/// round trip for a small message).
pub(crate) fn with_offered<R>(bytes: &Bytes, serialize: impl FnOnce() -> R) -> R {
    if bytes.len() < ZERO_COPY_MIN {
        return serialize();
    }
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            OFFER.with(|o| o.borrow_mut().take());
        }
    }
    OFFER.with(|o| *o.borrow_mut() = Some(bytes.clone()));
    let _clear = Clear;
    serialize()
}

/// The offered block, if `data` is exactly it.
pub(crate) fn take_offered(data: &[u8]) -> Option<Bytes> {
    OFFER.with(|o| {
        let mut o = o.borrow_mut();
        let same = o
            .as_ref()
            .is_some_and(|b| b.as_ptr() == data.as_ptr() && b.len() == data.len());
        if same {
            o.take()
        } else {
            None
        }
    })
}

/// Restores the previous decode source on drop (also on unwind).
struct SourceGuard(Option<Bytes>);

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        SOURCE.with(|s| *s.borrow_mut() = prev);
    }
}

/// Decodes a payload that must span all of `bytes`. Byte blocks inside it
/// decoded as [`ByteBuf`](crate::ByteBuf) share `bytes` (no copy).
pub(crate) fn decode_payload<T: DeserializeOwned>(
    bytes: &Bytes,
    what: &'static str,
) -> Result<T, CodecError> {
    let _guard = SourceGuard(SOURCE.with(|s| s.borrow_mut().replace(bytes.clone())));
    let (value, used) =
        bincode::serde::borrow_decode_from_slice::<T, _>(bytes, config()).map_err(|e| {
            CodecError::Decode {
                what,
                error: Box::new(e),
            }
        })?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes {
            what,
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

/// `slice` as a shared view of the payload being decoded, if it lies in it.
pub(crate) fn share_from_source(slice: &[u8]) -> Option<Bytes> {
    SOURCE.with(|s| {
        let src = s.borrow();
        let src = src.as_ref()?;
        let base = src.as_ptr() as usize;
        let start = (slice.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(slice.len())?;
        (end <= src.len()).then(|| src.slice(start..end))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_length_field_is_a_clean_error_not_an_allocation() {
        // varint tag 253 = u64 follows: claims 2^60 bytes of string.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = decode::<String>(&bytes, "string").unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err:?}");
        let err = decode::<Vec<u64>>(&bytes, "vec").unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err:?}");
        // The codec's reason is in the message, once: not also a source.
        let shown = err.to_string();
        assert!(shown.starts_with("could not decode vec: "), "{shown}");
        assert!(shown.len() > "could not decode vec: ".len(), "{shown}");
        assert!(std::error::Error::source(&err).is_none());
    }

    #[test]
    fn payload_byte_blocks_share_the_source_buffer() {
        let mut buf = Vec::new();
        encode(&mut buf, &(7u8, crate::ByteBuf::from(vec![9u8; 100])), "p").unwrap();
        let src = Bytes::from(buf);
        let (n, b): (u8, crate::ByteBuf) = decode_payload(&src, "p").unwrap();
        assert_eq!(n, 7);
        assert_eq!(&b[..], &[9u8; 100][..]);
        // Same memory, not a copy.
        assert_eq!(b.as_ptr(), src[2..].as_ptr());
        // Outside a decode, nothing is shared.
        assert!(share_from_source(&src[..]).is_none());
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let mut buf = Vec::new();
        encode(&mut buf, &7u32, "n").unwrap();
        buf.push(0);
        assert!(matches!(
            decode::<u32>(&buf, "n"),
            Err(CodecError::TrailingBytes { extra: 1, .. })
        ));
    }
}
