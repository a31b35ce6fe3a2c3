//! A keyed hash for the stream-id maps: one multiply per lookup instead of SipHash's rounds.
//!
//! Stream ids come from the peer, so the key is random per map (seeded from std's
//! `RandomState`): a peer that does not know it cannot choose ids that collide. The number
//! of streams a peer may open is bounded too ([`Limits::max_streams`](super::Limits)), so even
//! a bad spread costs a bounded probe.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
};

/// A `HashMap` keyed by stream id.
pub(crate) type IdMap<V> = std::collections::HashMap<u32, V, IdHash>;

/// Builds [`IdHasher`]s with a key drawn once per map.
#[derive(Clone)]
pub(crate) struct IdHash {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for IdHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays private: it is what keeps a peer from choosing colliding ids.
        f.write_str("IdHash")
    }
}

impl Default for IdHash {
    fn default() -> IdHash {
        let seed = RandomState::new();
        IdHash {
            k0: seed.hash_one(0x6e65_7463_6861_6e30_u64),
            // Odd, so the multiply loses no bits.
            k1: seed.hash_one(0x6e65_7463_6861_6e31_u64) | 1,
        }
    }
}

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            state: self.k0,
            k1: self.k1,
        }
    }
}

/// A folded multiply of each word written with the map's key: the high and low halves of the
/// 128-bit product are mixed, so both the bucket (low bits) and the tag (high bits) depend on
/// every bit of the id.
pub(crate) struct IdHasher {
    state: u64,
    k1: u64,
}

impl IdHasher {
    fn mix(&mut self, word: u64) {
        let product = u128::from(self.state ^ word) * u128::from(self.k1);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.state
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.mix(u64::from(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_spread_over_buckets_and_maps_differ_in_key() {
        let a = IdHash::default();
        // Consecutive ids of one parity, as a peer opens them, fill the low bits evenly.
        let mut buckets = [0u32; 64];
        for id in (1..4096u32).step_by(2) {
            buckets[(a.hash_one(id) & 63) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (8..=56).contains(&n)),
            "2048 ids over 64 buckets: {buckets:?}"
        );
        let b = IdHash::default();
        assert_ne!(
            a.hash_one(7u32),
            b.hash_one(7u32),
            "each map has its own key"
        );
        let mut map: IdMap<u32> = IdMap::default();
        for id in 0..1000 {
            map.insert(id * 2 + 1, id);
        }
        assert!((0..1000).all(|id| map[&(id * 2 + 1)] == id));
    }
}
