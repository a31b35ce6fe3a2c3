//! A keyed hash for the stream-id maps: two multiplies per lookup instead of SipHash's rounds.
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
pub type IdMap<V> = std::collections::HashMap<u32, V, IdHash>;

/// Builds [`IdHasher`]s with a key drawn once per map.
#[derive(Clone)]
pub struct IdHash {
    key: u64,
}

impl std::fmt::Debug for IdHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays private: it is what keeps a peer from choosing colliding ids.
        f.write_str("IdHash")
    }
}

impl Default for IdHash {
    fn default() -> IdHash {
        IdHash {
            key: RandomState::new().hash_one(0x6e65_7463_6861_6e30_u64),
        }
    }
}

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { state: self.key }
    }
}

/// Each word written is XORed into the state, which then goes through SplitMix64's finaliser:
/// a bijection in which every output bit depends on every input bit, so both the bucket (low
/// bits) and the tag (high bits) spread whatever the key (a single folded multiply did not:
/// with some keys half of a run of ids shared one bucket of 64).
pub struct IdHasher {
    state: u64,
}

impl IdHasher {
    fn mix(&mut self, word: u64) {
        let mut z = self.state ^ word;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.state = z ^ (z >> 31);
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
        // Consecutive ids of one parity, as a peer opens them, fill the low bits evenly,
        // whatever the key (fixed keys here, so that the test is deterministic).
        let keys = [0, 1, u64::MAX, 0x8000_0000_0000_0000, 0x5851_f42d_4c95_7f2d];
        for key in keys
            .into_iter()
            .chain((0..64).map(|k: u64| 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(k)))
        {
            let hash = IdHash { key };
            let mut buckets = [0u32; 64];
            for id in (1..4096u32).step_by(2) {
                buckets[(hash.hash_one(id) & 63) as usize] += 1;
            }
            assert!(
                buckets.iter().all(|&n| (8..=56).contains(&n)),
                "key {key:#x}: 2048 ids over 64 buckets: {buckets:?}"
            );
        }
        let a = IdHash::default();
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
