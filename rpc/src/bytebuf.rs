//! [`ByteBuf`]: a byte payload that encodes as one block.

use std::{fmt, ops::Deref};

use bytes::Bytes;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Bytes for use inside requests, responses and stream items (file chunks,
/// blobs).
///
/// A plain `Vec<u8>` goes through serde as a sequence, one element at a time
/// — correct but slow for large buffers. `ByteBuf` is encoded as a single
/// length-prefixed block instead (the same bytes on the wire as a
/// `Vec<u8>`, so the two are interchangeable between peers), and is backed
/// by [`bytes::Bytes`], so cloning it (to answer many calls with one buffer)
/// is cheap. Received `ByteBuf`s share the received frame's buffer instead
/// of copying out of it, and large ones are sent without being copied into
/// the write buffer.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteBuf(Bytes);

impl ByteBuf {
    /// An empty buffer.
    pub fn new() -> ByteBuf {
        ByteBuf::default()
    }

    /// The bytes as [`bytes::Bytes`] (no copy).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The bytes as a `Vec<u8>` (copies unless this is the only reference to
    /// a buffer that came from a `Vec`).
    pub fn into_vec(self) -> Vec<u8> {
        self.0.into()
    }
}

impl Deref for ByteBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for ByteBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for ByteBuf {
    fn from(v: Vec<u8>) -> ByteBuf {
        ByteBuf(Bytes::from(v))
    }
}

impl From<Bytes> for ByteBuf {
    fn from(b: Bytes) -> ByteBuf {
        ByteBuf(b)
    }
}

impl From<&[u8]> for ByteBuf {
    fn from(b: &[u8]) -> ByteBuf {
        ByteBuf(Bytes::copy_from_slice(b))
    }
}

impl fmt::Debug for ByteBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByteBuf({} bytes)", self.0.len())
    }
}

impl Serialize for ByteBuf {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Offered so that the rpc outbox can queue a large block by
        // reference (written with a gather write) instead of copying it.
        crate::codec::with_offered(&self.0, || s.serialize_bytes(&self.0))
    }
}

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteBuf, D::Error> {
        // `deserialize_bytes`: a borrowing decoder hands us the block in
        // place, and when it lies in the frame being decoded we keep a
        // shared view of the frame instead of copying it.
        d.deserialize_bytes(Visitor)
    }
}

struct Visitor;

impl<'de> de::Visitor<'de> for Visitor {
    type Value = ByteBuf;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte buffer")
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
        Ok(ByteBuf::from(v))
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<ByteBuf, E> {
        Ok(crate::codec::share_from_source(v)
            .map(ByteBuf)
            .unwrap_or_else(|| ByteBuf::from(v)))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
        Ok(ByteBuf::from(v))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
        // Self-describing formats may hand us a sequence of numbers.
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(ByteBuf::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn encodes_like_a_vec_of_bytes() {
        let data = vec![1u8, 2, 3, 250, 255];
        let mut a = Vec::new();
        codec::encode(&mut a, &ByteBuf::from(data.clone()), "buf").unwrap();
        let mut b = Vec::new();
        codec::encode(&mut b, &data, "vec").unwrap();
        assert_eq!(a, b);
        let back: ByteBuf = codec::decode(&b, "buf").unwrap();
        assert_eq!(&back[..], &data[..]);
        let back: Vec<u8> = codec::decode(&a, "vec").unwrap();
        assert_eq!(back, data);
    }
}
