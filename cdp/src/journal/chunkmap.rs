//! A lock-free bitmap of fixed-size chunks of one disk (the CBT bitmap
//! idea of `keel_vhost::cbt`, without names or persistence): which chunks
//! must be resent (`dirty`) and which were written while a resync read
//! was in flight (`touched`).

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per chunk.
pub struct ChunkMap {
    shift: u32,
    chunks: u64,
    words: Box<[AtomicU64]>,
}

impl ChunkMap {
    /// A clear map of `size` bytes in chunks of `chunk` bytes (a power of two).
    pub fn new(size: u64, chunk: u64) -> Self {
        let chunks = size.div_ceil(chunk);
        let nwords = usize::try_from(chunks.div_ceil(64)).unwrap_or(0);
        Self {
            shift: chunk.trailing_zeros(),
            chunks,
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// hot path: marks every chunk overlapping `offset..offset+len`.
    #[inline]
    pub fn set_range(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.shift;
        let last =
            (offset.saturating_add(len - 1) >> self.shift).min(self.chunks.saturating_sub(1));
        for c in first..=last {
            self.set(c);
        }
    }

    /// Marks chunk `c`.
    #[inline]
    pub fn set(&self, c: u64) {
        if let Some(w) = self.word(c) {
            let bit = 1u64 << (c % 64);
            if w.load(Ordering::Relaxed) & bit == 0 {
                w.fetch_or(bit, Ordering::AcqRel);
            }
        }
    }

    /// Clears chunk `c`; returns whether it was set.
    pub fn take(&self, c: u64) -> bool {
        self.word(c).is_some_and(|w| {
            let bit = 1u64 << (c % 64);
            w.fetch_and(!bit, Ordering::AcqRel) & bit != 0
        })
    }

    /// Whether chunk `c` is set.
    pub fn is_set(&self, c: u64) -> bool {
        self.word(c)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1u64 << (c % 64)) != 0)
    }

    /// Marks every chunk.
    pub fn set_all(&self) {
        for c in 0..self.chunks {
            self.set(c);
        }
    }

    /// Number of set chunks.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// The first set chunk at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut c = from;
        while c < self.chunks {
            let w = self.word(c)?.load(Ordering::Acquire) >> (c % 64);
            if w != 0 {
                let hit = c + u64::from(w.trailing_zeros());
                return (hit < self.chunks).then_some(hit);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    fn word(&self, c: u64) -> Option<&AtomicU64> {
        self.words.get(usize::try_from(c / 64).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_take_and_scan() {
        let m = ChunkMap::new(10 * 4096 + 1, 4096);
        assert_eq!(m.chunks(), 11);
        m.set_range(4095, 2);
        assert_eq!(m.count(), 2);
        assert_eq!(m.next_set(0), Some(0));
        assert_eq!(m.next_set(1), Some(1));
        assert_eq!(m.next_set(2), None);
        assert!(m.take(0));
        assert!(!m.take(0));
        m.set_range(u64::MAX - 10, 100); // clamped, no panic
        assert_eq!(m.count(), 1, "out-of-disk ranges are ignored");
        m.set_all();
        assert_eq!(m.count(), 11);
    }
}
