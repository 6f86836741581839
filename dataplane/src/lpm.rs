//! Longest-prefix-match table for IPv4 routes.
//!
//! One hash map per prefix length plus a bitmap of the lengths in use; a
//! lookup probes the used lengths from /32 down and stops at the first hit,
//! so it costs one hash probe per distinct prefix length in the table
//! (typically 2–4 for a VPC router). Hand-written: `ip_network_table` and
//! `treebitmap` work, but the former pulls a trie per family and the latter is
//! unmaintained since 2019; this is 60 lines checked by a property test
//! against a linear reference.

use std::net::Ipv4Addr;

use crate::fastmap::{self, FastMap};

/// An IPv4 prefix `addr/len` with host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    /// Builds a prefix, clearing host bits; `None` when `len > 32`.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Prefix> {
        (len <= 32).then(|| Prefix {
            addr: Ipv4Addr::from(u32::from(addr) & mask(len)),
            len,
        })
    }

    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// Whether two prefixes share any address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let len = self.len.min(other.len);
        u32::from(self.addr) & mask(len) == u32::from(other.addr) & mask(len)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Prefix {
    type Err = ();
    /// Parses `a.b.c.d/len`; host bits must be zero.
    fn from_str(s: &str) -> Result<Prefix, ()> {
        let (addr, len) = s.split_once('/').ok_or(())?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| ())?;
        let len: u8 = len.parse().map_err(|_| ())?;
        let prefix = Prefix::new(addr, len).ok_or(())?;
        (prefix.addr == addr).then_some(prefix).ok_or(())
    }
}

/// The network mask of a prefix length (0..=32).
pub fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        1..=32 => u32::MAX << (32 - u32::from(len)),
        _ => u32::MAX,
    }
}

/// Longest-prefix-match table.
#[derive(Debug, Clone)]
pub struct Lpm<V> {
    by_len: Vec<FastMap<u32, V>>,
    /// Bit `n` set when some prefix has length `n`.
    used: u64,
}

impl<V> Default for Lpm<V> {
    fn default() -> Self {
        Lpm {
            by_len: (0..=32).map(|_| fastmap::with_capacity(0)).collect(),
            used: 0,
        }
    }
}

impl<V> Lpm<V> {
    /// Inserts or replaces the value of a prefix; returns the old value.
    pub fn insert(&mut self, prefix: Prefix, value: V) -> Option<V> {
        self.used |= 1 << prefix.len;
        self.by_len
            .get_mut(usize::from(prefix.len))?
            .insert(u32::from(prefix.addr), value)
    }

    /// The value stored for exactly `prefix`.
    pub fn get_mut(&mut self, prefix: Prefix) -> Option<&mut V> {
        self.by_len
            .get_mut(usize::from(prefix.len))?
            .get_mut(&u32::from(prefix.addr))
    }

    /// The value of the longest prefix containing `ip`.
    // hot path: one hash probe per prefix length in use; no allocation.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<&V> {
        let ip = u32::from(ip);
        let mut used = self.used;
        while used != 0 {
            // Highest set bit = longest remaining length (fits in u8: < 64).
            let len = 63 - used.leading_zeros();
            used &= !(1u64 << len);
            let len8 = u8::try_from(len).unwrap_or(32);
            let table = self.by_len.get(usize::from(len8))?;
            if let Some(v) = table.get(&(ip & mask(len8))) {
                return Some(v);
            }
        }
        None
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.by_len.iter().map(FastMap::len).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn longest_match_wins() {
        let mut t = Lpm::default();
        t.insert(p("0.0.0.0/0"), "default");
        t.insert(p("10.0.0.0/8"), "ten");
        t.insert(p("10.1.0.0/16"), "ten-one");
        t.insert(p("10.1.2.3/32"), "host");
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(&"host"));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()), Some(&"ten-one"));
        assert_eq!(t.lookup("10.2.0.1".parse().unwrap()), Some(&"ten"));
        assert_eq!(t.lookup("192.0.2.1".parse().unwrap()), Some(&"default"));
        assert_eq!(t.len(), 4);
        let empty: Lpm<u8> = Lpm::default();
        assert_eq!(empty.lookup("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn prefix_parsing_is_strict() {
        assert_eq!(p("10.0.0.0/24").len, 24);
        for bad in [
            "10.0.0.1/24",
            "10.0.0.0/33",
            "10.0.0.0",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        assert!(p("10.0.0.0/8").overlaps(&p("10.2.0.0/16")));
        assert!(!p("10.1.0.0/16").overlaps(&p("10.2.0.0/16")));
    }

    proptest! {
        #[test]
        fn matches_linear_reference(
            routes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            let mut t = Lpm::default();
            let mut reference: Vec<(Prefix, usize)> = Vec::new();
            for (i, (addr, len)) in routes.iter().enumerate() {
                let prefix = Prefix::new(Ipv4Addr::from(*addr), *len).unwrap();
                t.insert(prefix, i);
                reference.retain(|(q, _)| *q != prefix);
                reference.push((prefix, i));
            }
            // Probe both random addresses and the route addresses themselves.
            let all = probes.iter().copied().chain(routes.iter().map(|r| r.0));
            for ip in all {
                let ip = Ipv4Addr::from(ip);
                let want = reference.iter().filter(|(q, _)| q.contains(ip)).max_by_key(|(q, _)| q.len).map(|(_, v)| v);
                prop_assert_eq!(t.lookup(ip), want);
            }
        }
    }
}
