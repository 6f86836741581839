//! The conntrack hash index: a fixed-size open-addressing table from a
//! tuple to a connection slot and direction.
//!
//! Hand-written because `std`/`hashbrown` maps cannot promise never to
//! allocate: deletions leave tombstones and a table more than half full
//! re-sizes (allocates) instead of rehashing in place. Here slots are 8
//! bytes (a 32-bit hash tag and the value), linear probing, deletion by
//! backward shift (no tombstones), and the table holds at most half as many
//! keys as slots, so probes stay short and nothing ever grows. Keys are not
//! stored: a tag hit is confirmed against the connection's own tuple.

use std::hash::BuildHasher;

use super::{Conn, Dir, Key};

const EMPTY: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Low 32 bits of the key's hash: the home slot and a cheap filter.
    tag: u32,
    /// Connection id << 1 | direction (1 = reply); `EMPTY` when free.
    val: u32,
}

/// Key → (connection, direction) for up to `keys` keys.
pub struct Index {
    slots: Vec<Slot>,
    mask: usize,
    hasher: foldhash::fast::RandomState,
}

fn key_of(c: &Conn, val: u32) -> &Key {
    if val & 1 == 0 {
        &c.orig
    } else {
        &c.reply
    }
}

impl Index {
    /// Room for `keys` keys at most half the slots (allocated now).
    pub fn with_keys(keys: usize) -> Index {
        let n = (keys.max(1) * 2).next_power_of_two();
        Index {
            slots: vec![Slot { tag: 0, val: EMPTY }; n],
            mask: n - 1,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Bytes of the table.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    fn tag(&self, key: &Key) -> u32 {
        // Truncation intended: the low 32 bits are the tag.
        (self.hasher.hash_one(key) & 0xffff_ffff) as u32
    }

    fn home(&self, tag: u32) -> usize {
        tag as usize & self.mask
    }

    /// The slot holding `key`, and its value.
    // hot path: one hash, a short probe, one key compare per tag hit.
    fn find(&self, key: &Key, conns: &[Conn]) -> Option<(usize, u32)> {
        let tag = self.tag(key);
        let mut i = self.home(tag);
        for _ in 0..self.slots.len() {
            let s = self.slots.get(i)?;
            if s.val == EMPTY {
                return None;
            }
            if s.tag == tag
                && conns.get((s.val >> 1) as usize).map(|c| key_of(c, s.val)) == Some(key)
            {
                return Some((i, s.val));
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// The connection and direction `key` belongs to.
    pub fn get(&self, key: &Key, conns: &[Conn]) -> Option<(u32, Dir)> {
        self.find(key, conns).map(|(_, v)| {
            (
                v >> 1,
                if v & 1 == 0 {
                    Dir::Original
                } else {
                    Dir::Reply
                },
            )
        })
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &Key, conns: &[Conn]) -> bool {
        self.find(key, conns).is_some()
    }

    /// Adds `key` for connection `id` in `dir`. The caller keeps the key
    /// count within the capacity given at construction.
    pub fn insert(&mut self, key: &Key, id: u32, dir: Dir) {
        let tag = self.tag(key);
        let mut i = self.home(tag);
        let val = (id << 1) | u32::from(dir == Dir::Reply);
        for _ in 0..self.slots.len() {
            match self.slots.get_mut(i) {
                Some(s) if s.val == EMPTY => {
                    *s = Slot { tag, val };
                    return;
                }
                Some(_) => i = (i + 1) & self.mask,
                None => return,
            }
        }
    }

    /// Removes `key`; later entries of its probe run shift back into the gap.
    pub fn remove(&mut self, key: &Key, conns: &[Conn]) {
        let Some((mut hole, _)) = self.find(key, conns) else {
            return;
        };
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let Some(s) = self.slots.get(j).copied() else {
                break;
            };
            if s.val == EMPTY {
                break;
            }
            let home = self.home(s.tag);
            // Move it unless its home lies cyclically in (hole, j].
            if (j.wrapping_sub(home) & self.mask) >= (j.wrapping_sub(hole) & self.mask) {
                if let Some(h) = self.slots.get_mut(hole) {
                    *h = s;
                }
                hole = j;
            }
        }
        if let Some(h) = self.slots.get_mut(hole) {
            h.val = EMPTY;
        }
    }
}
