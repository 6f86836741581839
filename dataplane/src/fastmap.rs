//! A small multiplicative hasher for the integer keys of the forwarding
//! tables (MACs packed in `u64`, IPv4 addresses as `u32`).
//!
//! std's SipHash defends against hash flooding at ~20 ns a key; these tables
//! are keyed by configuration (bounded, trusted) and by learned MACs whose
//! count is capped, so a cheap mix is enough. Hand-written because it is six
//! lines; `rustc-hash`'s FxHasher is the same idea.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Creates an empty [`FastMap`] with room for `n` entries.
pub fn with_capacity<K, V>(n: usize) -> FastMap<K, V> {
    FastMap::with_capacity_and_hasher(n, BuildHasherDefault::default())
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Fx-style hasher: rotate, xor, multiply.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(K);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
    fn write_u16(&mut self, x: u16) {
        self.write_u64(u64::from(x));
    }
    fn finish(&self) -> u64 {
        // Fold the well-mixed high bits down: hashbrown uses the top 7 for tags
        // and the low ones for the bucket.
        self.0 ^ (self.0 >> 29)
    }
}

/// A MAC packed into the low 48 bits of a `u64`.
pub fn mac_key(mac: &[u8; 6]) -> u64 {
    u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]])
}
