//! Connection tracking: one bounded, pre-allocated table per worker.
//!
//! # Design
//!
//! - **Entries and keys.** A connection ([`Conn`]) is stored once, in a slab
//!   allocated at start; the hash index maps *two* keys to it: the original
//!   direction's tuple and the reply direction's tuple. Without NAT the reply
//!   tuple is the original reversed; with NAT it is the translated tuple
//!   reversed, so a reply finds its connection by what is on the wire (the
//!   design of Linux's `nf_conntrack` tuple hashes).
//! - **Zones.** Every key carries a zone: one per logical port with security
//!   groups, one per router with NAT. The same packet is tracked separately in
//!   the zone of the port it leaves, the router it crosses and the port it
//!   enters, like OVN's per-port conntrack zones. [`Conntrack::flush_zone_step`]
//!   removes one zone's connections a slice of the slab at a time (the
//!   worker runs a slice per batch), leaving other zones alone and never
//!   stalling forwarding.
//! - **Bounded.** Capacity is fixed at construction; the slab, its free
//!   list and the index ([`index`], a fixed open-addressing table at most
//!   half full) are allocated once. When the slab is full a new connection is refused:
//!   the packet is dropped, [`CtCounters::table_full`] counts it and a warning
//!   is logged once per full episode. Nothing allocates per packet.
//! - **Time.** The worker sets a coarse clock (seconds) once per batch
//!   ([`Conntrack::tick`]); each entry carries its expiry, set per state
//!   ([`Timeouts`]). Expired entries are treated as absent on lookup and are
//!   reclaimed by a sweep of [`SWEEP_PER_TICK`] slab slots per batch, so
//!   expiry never stalls forwarding.
//! - **TCP** ([`tcp`]): SYN / SYN-ACK / ESTABLISHED / FIN / CLOSE states and
//!   window checks in the style of Rooij / Linux `tcp_in_window`, loose enough
//!   for real stacks (mid-stream pick-up is allowed and is liberal until both
//!   directions are seen). UDP and ICMP get pseudo-states (new, then
//!   "replied" once the other direction was seen). ICMP errors are looked up
//!   by the connection quoted inside them ([`key::Extracted::related`]).
//!
//! # Threading model: per-worker tables and steering
//!
//! The engine is thread-per-core. Each worker owns one `Conntrack`, never
//! shared, so there is no lock at all. That only works if both directions of
//! a connection reach the same worker: frames are meant to be steered to
//! workers with [`steer`], a hash that is *symmetric* in the endpoints
//! (`steer(a→b) == steer(b→a)`), the software equivalent of symmetric RSS
//! (Toeplitz with a repeated 16-bit key). NAT breaks symmetry on the wire: as in VPP
//! NAT44-ED, SNAT and NAT64 pick only ports whose reply tuple steers to the
//! worker that created the session, and static DNAT is mapped back before
//! hashing ([`crate::steer`]); frames are moved to their worker by
//! [`crate::handoff`].
//!
//! # Assumptions
//!
//! - Keys hold IPv6-sized addresses; IPv4 is stored IPv4-mapped.
//! - The index uses `foldhash` with a random per-table seed: keys come from
//!   guests, and a fixed hash would let one pick colliding tuples.
//! - Non-first IP fragments carry no ports; they are not tracked (see
//!   [`key`]).

pub mod index;
pub mod key;
pub mod tcp;

pub use key::{Extracted, Key};
pub use tcp::{InvalidSegment, TcpSeg, TcpState};

/// Slab slots visited by the expiry sweep per [`Conntrack::tick`] (per batch).
pub const SWEEP_PER_TICK: usize = 64;

/// Seconds an entry lives without traffic, per state. Defaults follow Linux
/// `nf_conntrack` except ESTABLISHED (1 day instead of 5).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_fin: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub udp_new: u32,
    pub udp_replied: u32,
    pub icmp: u32,
    pub other: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: 120,
            tcp_established: 86_400,
            tcp_fin: 120,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp_new: 30,
            udp_replied: 120,
            icmp: 30,
            other: 600,
        }
    }
}

/// Direction of a packet relative to the connection's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Original,
    Reply,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Original => 0,
            Dir::Reply => 1,
        }
    }
}

/// One tracked connection.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    /// Tuple of the first packet, as seen in this zone.
    pub orig: Key,
    /// Tuple replies carry (the original reversed, translated by NAT).
    pub reply: Key,
    pub tcp: TcpState,
    /// Whether a packet in the reply direction was seen.
    pub replied: bool,
    /// Clock second after which the entry is dead.
    pub expires: u32,
    /// Configuration generation whose rules last allowed this connection;
    /// when tables change, the next packet re-checks the rules.
    pub generation: u64,
    /// Cut by a rule change: every packet is dropped until a new SYN reuses the tuple.
    pub blocked: bool,
    /// Owner data: for security-group zones, whether the original packet
    /// entered the port (ingress) rather than left it.
    pub ingress: bool,
    /// ICMP type and code of the original packet (rules match on them).
    pub icmp: (u8, u8),
    /// Router zones: the load-balancer member counter slot
    /// ([`crate::lb4::NO_MEMBER`] if none), valid for `generation`.
    pub lb: u32,
    live: bool,
}

/// What [`Conntrack::lookup`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub id: u32,
    pub dir: Dir,
}

/// Why [`Conntrack::create`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("Connection table full")]
    TableFull,
    #[error("Tuple already tracked")]
    KeyInUse,
}

/// Counts of one worker's table, folded into shared counters by the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct CtCounters {
    pub created: u64,
    pub expired: u64,
    pub table_full: u64,
    pub invalid: u64,
    pub flushed: u64,
}

/// A per-worker connection table.
pub struct Conntrack {
    conns: Vec<Conn>,
    free: Vec<u32>,
    index: index::Index,
    now: u32,
    hand: usize,
    full_logged: bool,
    pub timeouts: Timeouts,
    pub counters: CtCounters,
}

const EMPTY: Conn = Conn {
    orig: Key::ZERO,
    reply: Key::ZERO,
    tcp: TcpState::NONE,
    replied: false,
    expires: 0,
    generation: 0,
    blocked: false,
    ingress: false,
    icmp: (0, 0),
    lb: u32::MAX,
    live: false,
};

impl Conntrack {
    /// A table for up to `capacity` connections, allocated now and never grown.
    pub fn with_capacity(capacity: usize) -> Conntrack {
        let capacity = capacity.min(u32::MAX as usize / 2);
        Conntrack {
            conns: vec![EMPTY; capacity],
            // Popped from the end: hand out low slots first.
            free: (0..u32::try_from(capacity).unwrap_or(0)).rev().collect(),
            // Two keys per connection.
            index: index::Index::with_keys(capacity * 2),
            now: 0,
            hand: 0,
            full_logged: false,
            timeouts: Timeouts::default(),
            counters: CtCounters::default(),
        }
    }

    /// Maximum number of connections.
    pub fn capacity(&self) -> usize {
        self.conns.len()
    }

    /// Connections currently tracked (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The clock, in seconds.
    pub fn now(&self) -> u32 {
        self.now
    }

    /// Advances the clock and sweeps a few slots for expired entries.
    // hot path: once per batch; visits SWEEP_PER_TICK slots.
    pub fn tick(&mut self, now_secs: u32) {
        self.now = now_secs;
        let n = self.conns.len();
        if n == 0 {
            return;
        }
        for _ in 0..SWEEP_PER_TICK.min(n) {
            self.hand = (self.hand + 1) % n;
            let expired = self
                .conns
                .get(self.hand)
                .is_some_and(|c| c.live && self.now > c.expires);
            if expired {
                self.counters.expired += 1;
                self.remove(u32::try_from(self.hand).unwrap_or(u32::MAX));
            }
        }
    }

    /// Finds the connection `key` belongs to, and in which direction.
    // hot path: one hash lookup.
    pub fn lookup(&mut self, key: &Key) -> Option<Found> {
        let (id, dir) = self.index.get(key, &self.conns)?;
        let c = self.conns.get(id as usize)?;
        if self.now > c.expires {
            self.counters.expired += 1;
            self.remove(id);
            return None;
        }
        Some(Found { id, dir })
    }

    /// Starts tracking a connection whose first packet is `orig` and whose
    /// replies carry `reply`.
    pub fn create(&mut self, orig: Key, reply: Key, generation: u64) -> Result<u32, CreateError> {
        if self.index.contains(&orig, &self.conns) || self.index.contains(&reply, &self.conns) {
            return Err(CreateError::KeyInUse);
        }
        let Some(id) = self.free.pop() else {
            self.counters.table_full += 1;
            if !self.full_logged {
                self.full_logged = true;
                tracing::warn!(
                    capacity = self.conns.len(),
                    "connection table full: new connections are dropped"
                );
            }
            return Err(CreateError::TableFull);
        };
        self.full_logged = false;
        let timeout = self.timeouts.other;
        let Some(c) = self.conns.get_mut(id as usize) else {
            return Err(CreateError::TableFull);
        };
        *c = Conn {
            orig,
            reply,
            expires: self.now.saturating_add(timeout),
            generation,
            live: true,
            ..EMPTY
        };
        self.index.insert(&orig, id, Dir::Original);
        self.index.insert(&reply, id, Dir::Reply);
        self.counters.created += 1;
        Ok(id)
    }

    /// The connection `id`.
    pub fn get(&self, id: u32) -> Option<&Conn> {
        self.conns.get(id as usize).filter(|c| c.live)
    }

    /// The connection `id`, mutably.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Conn> {
        self.conns.get_mut(id as usize).filter(|c| c.live)
    }

    /// Advances the connection's state with a packet in `dir` and refreshes
    /// its expiry. `Err` = the packet is invalid for the connection (out of
    /// window, wrong handshake direction); the caller drops it.
    // hot path: a few compares.
    pub fn update(
        &mut self,
        id: u32,
        dir: Dir,
        proto: u8,
        seg: Option<&TcpSeg>,
    ) -> Result<(), InvalidSegment> {
        let t = self.timeouts;
        let now = self.now;
        let Some(c) = self.conns.get_mut(id as usize) else {
            return Err(InvalidSegment);
        };
        if dir == Dir::Reply {
            c.replied = true;
        }
        let timeout = match (proto, seg) {
            (crate::packet::headers::IPPROTO_TCP, Some(seg)) => {
                if let Err(e) = c.tcp.advance(dir.index(), seg) {
                    self.counters.invalid += 1;
                    return Err(e);
                }
                c.tcp.timeout(&t)
            }
            (crate::packet::headers::IPPROTO_UDP, _) if c.replied => t.udp_replied,
            (crate::packet::headers::IPPROTO_UDP, _) => t.udp_new,
            (crate::packet::headers::IPPROTO_ICMP | crate::packet::headers::IPPROTO_ICMPV6, _) => {
                t.icmp
            }
            _ => t.other,
        };
        c.expires = now.saturating_add(timeout);
        Ok(())
    }

    /// Stops tracking `id` (both keys), returning its slot to the free list.
    pub fn remove(&mut self, id: u32) {
        let Some(c) = self.conns.get(id as usize).filter(|c| c.live) else {
            return;
        };
        let (orig, reply) = (c.orig, c.reply);
        // The index confirms keys against the slab: remove before freeing.
        self.index.remove(&orig, &self.conns);
        self.index.remove(&reply, &self.conns);
        if let Some(c) = self.conns.get_mut(id as usize) {
            c.live = false;
        }
        self.free.push(id);
    }

    /// Removes every connection of `zone`; returns how many. One pass over
    /// the slab; other zones' entries are not touched.
    pub fn flush_zone(&mut self, zone: u32) -> usize {
        let (n, _) = self.flush_zone_step(zone, 0, self.conns.len());
        n
    }

    /// Removes the connections of `zone` among slab slots `from..from+count`;
    /// returns how many and the next slot (`None` when the pass is done).
    /// Workers flush a few thousand slots per batch so a flush never stalls
    /// forwarding.
    pub fn flush_zone_step(
        &mut self,
        zone: u32,
        from: usize,
        count: usize,
    ) -> (usize, Option<usize>) {
        let end = from.saturating_add(count).min(self.conns.len());
        let mut n = 0;
        for id in from..end {
            let hit = self
                .conns
                .get(id)
                .is_some_and(|c| c.live && c.orig.zone == zone);
            if hit {
                self.remove(u32::try_from(id).unwrap_or(u32::MAX));
                n += 1;
            }
        }
        self.counters.flushed += n as u64;
        (n, (end < self.conns.len()).then_some(end))
    }

    /// Whether `key` is in use by any live connection (either direction).
    pub fn key_in_use(&self, key: &Key) -> bool {
        self.index.contains(key, &self.conns)
    }

    /// Bytes per tracked connection: the slab entry, its free-list slot and
    /// its share of the index (for the benchmark's memory report).
    pub fn bytes_per_connection(&self) -> usize {
        let slab = std::mem::size_of::<Conn>() + std::mem::size_of::<u32>();
        slab + self.index.bytes() / self.conns.len().max(1)
    }
}

/// The worker a frame of this flow should be processed on, out of
/// `workers`. Symmetric: both directions of a connection give the same
/// answer, so one worker's table sees the whole connection.
pub fn steer(a: u128, a_port: u16, b: u128, b_port: u16, proto: u8, workers: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let (lo, hi) = if (a, a_port) <= (b, b_port) {
        ((a, a_port), (b, b_port))
    } else {
        ((b, b_port), (a, a_port))
    };
    // A fixed seed: every worker and the steering NIC/queue must agree.
    let mut h = foldhash::fast::FixedState::with_seed(0x6b65_656c).build_hasher();
    h.write_u128(lo.0);
    h.write_u16(lo.1);
    h.write_u128(hi.0);
    h.write_u16(hi.1);
    h.write_u8(proto);
    usize::try_from(h.finish() % workers.max(1) as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::headers::{IPPROTO_TCP, IPPROTO_UDP};

    fn key(zone: u32, sport: u16) -> Key {
        Key {
            src: key::v4([10, 0, 0, 1]),
            dst: key::v4([10, 0, 0, 2]),
            zone,
            sport,
            dport: 53,
            proto: IPPROTO_UDP,
        }
    }

    #[test]
    fn both_directions_find_one_connection() {
        let mut ct = Conntrack::with_capacity(4);
        let k = key(1, 1000);
        let id = ct.create(k, k.reversed(), 1).unwrap();
        assert_eq!(
            ct.lookup(&k),
            Some(Found {
                id,
                dir: Dir::Original
            })
        );
        assert_eq!(
            ct.lookup(&k.reversed()),
            Some(Found {
                id,
                dir: Dir::Reply
            })
        );
        // Another zone is another table.
        assert_eq!(ct.lookup(&key(2, 1000)), None);
        assert_eq!(ct.create(k, k.reversed(), 1), Err(CreateError::KeyInUse));
    }

    #[test]
    fn full_table_refuses_and_counts_then_recovers() {
        let mut ct = Conntrack::with_capacity(2);
        let a = ct.create(key(1, 1), key(1, 1).reversed(), 1).unwrap();
        ct.create(key(1, 2), key(1, 2).reversed(), 1).unwrap();
        assert_eq!(
            ct.create(key(1, 3), key(1, 3).reversed(), 1),
            Err(CreateError::TableFull)
        );
        assert_eq!(
            ct.create(key(1, 4), key(1, 4).reversed(), 1),
            Err(CreateError::TableFull)
        );
        assert_eq!(ct.counters.table_full, 2);
        ct.remove(a);
        assert!(ct.create(key(1, 3), key(1, 3).reversed(), 1).is_ok());
        assert_eq!(ct.len(), 2);
    }

    #[test]
    fn udp_timeouts_expire_entries_by_lookup_and_sweep() {
        let mut ct = Conntrack::with_capacity(8);
        ct.tick(100);
        let a = ct.create(key(1, 1), key(1, 1).reversed(), 1).unwrap();
        ct.update(a, Dir::Original, IPPROTO_UDP, None).unwrap();
        let b = ct.create(key(1, 2), key(1, 2).reversed(), 1).unwrap();
        ct.update(b, Dir::Original, IPPROTO_UDP, None).unwrap();
        ct.update(b, Dir::Reply, IPPROTO_UDP, None).unwrap();
        // a (unreplied, 30 s) dies before b (replied, 120 s).
        ct.tick(131);
        assert_eq!(ct.lookup(&key(1, 1)), None);
        assert!(ct.lookup(&key(1, 2)).is_some());
        ct.tick(100 + 121);
        assert_eq!(ct.len(), 0, "the sweep reclaims without a lookup");
        assert_eq!(ct.counters.expired, 2);
    }

    #[test]
    fn flush_zone_leaves_other_zones() {
        let mut ct = Conntrack::with_capacity(16);
        for p in 0..5 {
            ct.create(key(7, p), key(7, p).reversed(), 1).unwrap();
            ct.create(key(8, p), key(8, p).reversed(), 1).unwrap();
        }
        assert_eq!(ct.flush_zone(7), 5);
        assert_eq!(ct.len(), 5);
        assert!(ct.lookup(&key(8, 3)).is_some());
        assert!(ct.lookup(&key(7, 3)).is_none());
    }

    #[test]
    fn incremental_flush_covers_the_whole_slab() {
        let mut ct = Conntrack::with_capacity(16);
        for p in 0..7 {
            ct.create(key(7, p), key(7, p).reversed(), 1).unwrap();
            ct.create(key(8, p), key(8, p).reversed(), 1).unwrap();
        }
        let (mut from, mut total, mut steps) = (Some(0), 0, 0);
        while let Some(f) = from {
            let (n, next) = ct.flush_zone_step(7, f, 3);
            total += n;
            from = next;
            steps += 1;
        }
        assert_eq!((total, steps, ct.len()), (7, 6, 7));
        assert!(ct.lookup(&key(8, 6)).is_some());
    }

    #[test]
    fn steering_is_symmetric() {
        let a = key::v4([10, 0, 0, 1]);
        let b = key::v4([192, 0, 2, 9]);
        let mut spread = [0usize; 4];
        for p in 1000..1400u16 {
            let w = steer(a, p, b, 443, IPPROTO_TCP, 4);
            assert_eq!(w, steer(b, 443, a, p, IPPROTO_TCP, 4));
            spread[w] += 1;
        }
        assert!(spread.iter().all(|n| *n > 50), "{spread:?}");
    }
}

#[cfg(test)]
mod churn {
    use super::*;
    use crate::packet::headers::IPPROTO_UDP;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random creates and removes in a small table (long probe runs,
        /// wrap-around, backward shifts) agree with a model map.
        #[test]
        fn index_agrees_with_a_model_under_churn(ops in proptest::collection::vec((any::<bool>(), 0u16..40), 1..400)) {
            let mut ct = Conntrack::with_capacity(16);
            let mut model: std::collections::HashMap<u16, u32> = Default::default();
            let key = |p: u16| Key { src: key::v4([10, 0, 0, 1]), dst: key::v4([10, 0, 0, 2]), zone: 3, sport: p, dport: 53, proto: IPPROTO_UDP };
            for (add, p) in ops {
                if add {
                    match ct.create(key(p), key(p).reversed(), 1) {
                        Ok(id) => { prop_assert!(model.insert(p, id).is_none()); }
                        Err(CreateError::KeyInUse) => prop_assert!(model.contains_key(&p)),
                        Err(CreateError::TableFull) => prop_assert_eq!(model.len(), 16),
                    }
                } else if let Some(id) = model.remove(&p) {
                    ct.remove(id);
                }
                for q in 0..40u16 {
                    let want = model.get(&q).copied();
                    prop_assert_eq!(ct.lookup(&key(q)).map(|f| f.id), want);
                    prop_assert_eq!(ct.lookup(&key(q).reversed()).map(|f| (f.id, f.dir)), want.map(|id| (id, Dir::Reply)));
                }
            }
        }
    }
}
