//! The per-worker flow cache in front of the logical pipeline.
//!
//! Design: exact match on (in-port, frame length, the first [`KEY_BYTES`]
//! bytes of the frame) → the pipeline's [`Decision`] plus the rewritten first
//! [`KEY_BYTES`] bytes. A hit copies those bytes over the frame (MAC rewrite,
//! TTL decrement and checksum come out byte-identical to the slow path,
//! because the slow path's output was a function of exactly the keyed bytes).
//!
//! Conservative by construction, the cache only stores a result when:
//! - the tables have no stateful stage (security groups, NAT, firewall), no
//!   QoS, no router policies and no NAT64 configured ([`tables_cacheable`]):
//!   those keep per-packet state (conntrack, meters, hit counters) that a
//!   replay would skip;
//! - the frame is untagged or tagged IPv4 without options, not a fragment,
//!   not DHCP (the only stages that read bytes beyond the headers);
//! - the verdict is unicast, flood or drop (never a generated reply), the
//!   frame length did not change and nothing past the keyed bytes changed;
//! - no MAC was learned by this packet.
//!
//! Invalidation: an entry carries the epoch it was filled in; the epoch moves
//! when the tables' generation changes or the worker's learned-MAC table
//! changes ([`crate::pipeline::Learned::version`]), so older entries miss.
//!
//! Threading model: one cache per worker, never shared; fixed size,
//! allocated once; 2-way set associative, the older way is evicted.

use crate::pipeline::{Decision, Verdict};
use crate::tables::Tables;

/// Frame bytes in the key: Ethernet + VLAN + IPv4 (no options) + TCP header fit.
pub const KEY_BYTES: usize = 64;
/// Entries per worker when none is given.
pub const DEFAULT_ENTRIES: usize = 16 * 1024;
const WAYS: usize = 2;

/// Flow-cache counters of a worker, folded into [`crate::counters::Stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowCacheCounters {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub invalidations: u64,
}

#[derive(Clone)]
struct Entry {
    /// 0 = empty; else the epoch the entry was filled in.
    epoch: u64,
    hash: u64,
    /// Fill order within the set, for eviction.
    stamp: u64,
    in_port: u16,
    len: u16,
    key: [u8; KEY_BYTES],
    out: [u8; KEY_BYTES],
    decision: Decision,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            epoch: 0,
            hash: 0,
            stamp: 0,
            in_port: 0,
            len: 0,
            key: [0; KEY_BYTES],
            out: [0; KEY_BYTES],
            decision: Decision {
                verdict: Verdict::Drop(crate::counters::DropReason::Oversize),
                outcome: None,
                learned: false,
            },
        }
    }
}

/// A lookup result that can be stored after the slow path ran.
#[derive(Debug, Clone, Copy)]
pub struct Miss {
    hash: u64,
    in_port: u16,
    len: u16,
    key: [u8; KEY_BYTES],
}

/// One worker's flow cache.
pub struct FlowCache {
    entries: Box<[Entry]>,
    sets_mask: usize,
    epoch: u64,
    generation: u64,
    learn_version: u64,
    stamp: u64,
    /// Whether the current tables allow caching at all.
    active: bool,
    pub counters: FlowCacheCounters,
}

impl FlowCache {
    /// A cache of at least `entries` entries (rounded up to a power of two).
    pub fn new(entries: usize) -> FlowCache {
        let sets = (entries.max(WAYS) / WAYS).next_power_of_two();
        FlowCache {
            entries: vec![Entry::default(); sets * WAYS].into_boxed_slice(),
            sets_mask: sets - 1,
            epoch: 1,
            generation: u64::MAX,
            learn_version: 0,
            stamp: 0,
            active: false,
            counters: FlowCacheCounters::default(),
        }
    }

    /// First way of the set `hash` maps to.
    fn set_of(&self, hash: u64) -> usize {
        // Only the low bits select the set: truncation is intended.
        #[allow(clippy::cast_possible_truncation)]
        let low = hash as usize;
        (low & self.sets_mask) * WAYS
    }

    /// Bytes one entry takes.
    pub fn bytes_per_entry() -> usize {
        std::mem::size_of::<Entry>()
    }

    /// Moves the epoch when the tables or learned MACs changed (once per batch
    /// and after every slow-path packet).
    // hot path: two compares.
    pub fn sync(&mut self, t: &Tables, learn_version: u64) {
        if self.generation != t.generation {
            self.generation = t.generation;
            self.active = tables_cacheable(t);
            self.invalidate(learn_version);
        } else if self.learn_version != learn_version {
            self.invalidate(learn_version);
        }
    }

    fn invalidate(&mut self, learn_version: u64) {
        self.learn_version = learn_version;
        self.epoch += 1;
        self.counters.invalidations += 1;
    }

    /// Looks `frame` up; on a hit rewrites it and returns the decision, on a
    /// cacheable miss returns what [`FlowCache::insert`] needs.
    // hot path: one hash, two compares of 64 bytes, one copy.
    pub fn lookup(
        &mut self,
        in_port: u16,
        buf: &mut [u8],
        len: usize,
    ) -> Result<Decision, Option<Miss>> {
        if !self.active {
            return Err(None);
        }
        let Some(frame) = buf.get(..len) else {
            return Err(None);
        };
        if !frame_cacheable(frame) {
            self.counters.misses += 1;
            return Err(None);
        }
        let Ok(len16) = u16::try_from(len) else {
            return Err(None);
        };
        let mut key = [0u8; KEY_BYTES];
        let n = len.min(KEY_BYTES);
        if let (Some(k), Some(f)) = (key.get_mut(..n), frame.get(..n)) {
            k.copy_from_slice(f);
        }
        let hash = hash(in_port, len16, &key);
        let set = self.set_of(hash);
        if let Some(ways) = self.entries.get(set..set + WAYS) {
            for e in ways {
                if e.epoch == self.epoch
                    && e.hash == hash
                    && e.in_port == in_port
                    && e.len == len16
                    && e.key == key
                {
                    if let (Some(dst), Some(src)) = (buf.get_mut(..n), e.out.get(..n)) {
                        dst.copy_from_slice(src);
                    }
                    self.counters.hits += 1;
                    return Ok(e.decision);
                }
            }
        }
        self.counters.misses += 1;
        Err(Some(Miss {
            hash,
            in_port,
            len: len16,
            key,
        }))
    }

    /// Stores the slow path's result for `miss` when it can be replayed
    /// exactly: `out` is the frame after the pipeline, `tail_unchanged` says
    /// nothing past the keyed bytes changed.
    pub fn insert(&mut self, miss: &Miss, d: &Decision, out: &[u8], tail_unchanged: bool) {
        let replayable = matches!(
            d.verdict,
            Verdict::Unicast { .. }
                | Verdict::Flood { .. }
                | Verdict::Tunnel { .. }
                | Verdict::Drop(_)
        );
        if !replayable || d.learned || !tail_unchanged || out.len() != usize::from(miss.len) {
            return;
        }
        let set = self.set_of(miss.hash);
        let Some(ways) = self.entries.get_mut(set..set + WAYS) else {
            return;
        };
        let epoch = self.epoch;
        // An empty or stale way first, else the oldest.
        let victim = ways
            .iter_mut()
            .min_by_key(|e| if e.epoch == epoch { e.stamp } else { 0 });
        let Some(e) = victim else { return };
        if e.epoch == epoch {
            self.counters.evictions += 1;
        }
        self.stamp += 1;
        let n = out.len().min(KEY_BYTES);
        e.epoch = epoch;
        e.hash = miss.hash;
        e.stamp = self.stamp;
        e.in_port = miss.in_port;
        e.len = miss.len;
        e.key = miss.key;
        e.out = [0; KEY_BYTES];
        if let (Some(dst), Some(src)) = (e.out.get_mut(..n), out.get(..n)) {
            dst.copy_from_slice(src);
        }
        e.decision = *d;
    }
}

/// What the forwarding path's cache does with `frame` (a trace runs the full
/// pipeline and bypasses the cache; this says whether a worker would replay it).
pub fn trace_note(t: &Tables, frame: &[u8], d: &Decision, out_len: usize) -> String {
    let replayable = matches!(
        d.verdict,
        Verdict::Unicast { .. } | Verdict::Flood { .. } | Verdict::Tunnel { .. } | Verdict::Drop(_)
    );
    let why_not = if !tables_cacheable(t) {
        Some("stateful, QoS, policy or NAT64 stages are configured")
    } else if !frame_cacheable(frame) {
        Some("not IPv4 TCP/UDP/ICMP without options (or DHCP, or a fragment)")
    } else if !replayable {
        Some("the pipeline generates a reply")
    } else if out_len != frame.len() {
        Some("the pipeline changes the frame length")
    } else {
        None
    };
    match why_not {
        None => "bypassed by the trace; a worker caches this flow after its first packet".into(),
        Some(r) => format!("bypassed by the trace; a worker never caches this packet: {r}"),
    }
}

/// Whether the tables have no stage that keeps per-packet state.
pub fn tables_cacheable(t: &Tables) -> bool {
    t.stateful.acls.iter().all(Option::is_none)
        && t.stateful.routers.iter().all(Option::is_none)
        && t.qos.ports.is_empty()
        && t.qos.floating.is_empty()
        && t.qos.meters.is_empty()
        && t.policies.routers.iter().all(Vec::is_empty)
        && t.nat64.iter().all(Option::is_none)
}

/// Whether the pipeline's decision on `frame` depends only on its first
/// [`KEY_BYTES`] bytes and length: IPv4 without options, not a fragment,
/// not DHCP.
pub fn frame_cacheable(frame: &[u8]) -> bool {
    let mut off = 12;
    let et = |o: usize| {
        frame
            .get(o..o + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let mut ethertype = et(off);
    if ethertype == Some(0x8100) {
        off += 4;
        ethertype = et(off);
    }
    if ethertype != Some(0x0800) {
        return false;
    }
    let ip = off + 2;
    let (Some(&vihl), Some(frag), Some(&proto)) = (frame.get(ip), et(ip + 6), frame.get(ip + 9))
    else {
        return false;
    };
    if vihl != 0x45 || frag & 0x3fff != 0 {
        return false;
    }
    match proto {
        // ICMP and TCP: headers inside the key.
        1 | 6 => true,
        // UDP but not DHCP (the DHCP stage reads the payload).
        17 => match (et(ip + 20), et(ip + 22)) {
            (Some(s), Some(d)) => ![67, 68].contains(&s) && ![67, 68].contains(&d),
            _ => false,
        },
        _ => false,
    }
}

fn hash(in_port: u16, len: u16, key: &[u8; KEY_BYTES]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (u64::from(in_port) << 16 | u64::from(len)).wrapping_mul(K);
    for c in key.chunks_exact(8) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    h ^ (h >> 32)
}
