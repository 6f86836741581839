//! Stateful NAT64 on a router (RFC 6146), with the RFC 6052 well-known
//! prefix `64:ff9b::/96` or a configured /96: IPv6 clients reach IPv4
//! servers as `prefix + IPv4 address`, leaving from an IPv4 pool address.
//!
//! # Design
//!
//! - The binding table is the worker's connection table, in the router's
//!   NAT64 zone: the original key is the IPv6 tuple (client, `prefix+server`,
//!   ports, TCP/UDP/ICMPv6), the reply key the IPv4 tuple the server answers
//!   to (server, pool address, pool port, TCP/UDP/ICMP). TCP state and
//!   timeouts are conntrack's. A client keeps one pool address (hash of its
//!   address: RFC 6146's "paired" pooling); ports (and echo identifiers) are
//!   allocated per session like SNAT's: the client's own if free, then
//!   hash-chosen candidates, each checked for a free reply tuple.
//! - Header translation follows RFC 7915 (section 5.1 IPv6→IPv4, 4.1
//!   IPv4→IPv6): traffic class ⇄ TOS, hop limit ⇄ TTL (the router's
//!   decrement follows), DF set and ID 0 on the IPv4 side, ICMPv6 echo
//!   (128/129) ⇄ ICMP echo (8/0). The frame is translated in place (the
//!   payload moves by 20 bytes) and handed to the other family's routing.
//! - Checksums: the IPv4 header's is computed; TCP, UDP and ICMP checksums
//!   are updated incrementally (RFC 1624) for the pseudo-header change (ICMP
//!   has none, ICMPv6 has one), the port or identifier and the echo type,
//!   so the payload is never read. A UDP datagram without checksum from the
//!   IPv4 side gets a full one, as IPv6 requires.
//!
//! # Not yet
//!
//! ICMPv4 errors about a session (destination unreachable, time exceeded)
//! are translated to ICMPv6 (RFC 7915 4.2, the quoted packet too, its
//! TCP/UDP checksum updated incrementally); ICMPv6 errors from the IPv6
//! side are not (5.2) and are dropped with `nat64_unsupported`, as are
//! fragments, IPv6 extension headers and IPv4
//! options; no "packet too big" is sent when a 1500-byte IPv4 packet
//! becomes a 1520-byte IPv6 one (TCP's MSS keeps within the MTU); no
//! IPv4-initiated sessions (static bindings). With several workers each
//! session lives in its creator's table; its pool port is chosen so the
//! IPv4 replies steer back there ([`crate::steer`]).

use std::hash::Hasher;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::conntrack::key::{self, extract, from_v4};
use crate::conntrack::{CreateError, Dir, Key, TcpState};
use crate::counters::DropReason;
use crate::packet::checksum::{accumulate, finish, internet_checksum, pseudo};
use crate::packet::headers::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::packet::parse::{Ipv4Info, Ipv6Info};
use crate::packet::Parsed;
use crate::pipeline::Tracer;
use crate::stateful::WorkerState;

/// The RFC 6052 well-known prefix.
pub const WELL_KNOWN_PREFIX: &str = "64:ff9b::/96";
/// Candidate ports tried per new session before giving up.
const PORT_TRIES: u32 = 32;

/// NAT64 on a router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nat64Spec {
    pub router: String,
    /// An IPv6 /96; default `64:ff9b::/96`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// IPv4 addresses sessions leave from; each on one of the router's subnets.
    pub pool: Vec<String>,
    /// Port (and echo identifier) range; default 1024..=65535.
    #[serde(default)]
    pub port_min: Option<u16>,
    #[serde(default)]
    pub port_max: Option<u16>,
}

/// Why a NAT64 configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nat64Error {
    #[error("NAT64: unknown router {router:?}")]
    UnknownRouter { router: String },
    #[error("NAT64 on router {router:?}: configured twice")]
    Duplicate { router: String },
    #[error("NAT64 on router {router:?}: prefix {value:?} is not an IPv6 /96 (RFC 6052 prefixes other than /96 are not supported)")]
    BadPrefix { router: String, value: String },
    #[error("NAT64 on router {router:?}: pool address {value:?} is not IPv4")]
    PoolNotIpv4 { router: String, value: String },
    #[error("NAT64 on router {router:?}: empty pool")]
    EmptyPool { router: String },
    #[error("NAT64 on router {router:?}: pool address {ip} is on none of the router's subnets")]
    PoolOffRouter { router: String, ip: Ipv4Addr },
    #[error("NAT64 on router {router:?}: pool address {ip} is already used (port, gateway or NAT address)")]
    PoolInUse { router: String, ip: Ipv4Addr },
    #[error("NAT64 on router {router:?}: port range {min}..={max} is empty")]
    PortRangeOutOfOrder { router: String, min: u16, max: u16 },
}

/// A router's compiled NAT64.
#[derive(Debug, Clone)]
pub struct Nat64 {
    /// The prefix's top 96 bits (low 32 zero).
    pub prefix: u128,
    pub pool: Vec<Ipv4Addr>,
    pub ports: (u16, u16),
    pub zone: u32,
}

impl Nat64 {
    /// Whether `dst` is an IPv4 server embedded in the prefix.
    // hot path: one mask and compare.
    pub fn embeds(&self, dst: Ipv6Addr) -> bool {
        u128::from(dst) & !0xffff_ffff == self.prefix
    }

    /// Whether `ip` is a pool address.
    pub fn owns(&self, ip: Ipv4Addr) -> bool {
        self.pool.contains(&ip)
    }
}

/// Compiles the NAT64 specs per router (indexed like `routers`); pool
/// addresses are answered by ARP with the router port's MAC.
pub fn compile(
    specs: &[Nat64Spec],
    routers: &[&str],
    switches: &mut [crate::tables::Switch],
) -> Result<Vec<Option<Nat64>>, Nat64Error> {
    let mut out: Vec<Option<Nat64>> = vec![None; routers.len()];
    for s in specs {
        let router = || s.router.clone();
        let rid = routers
            .iter()
            .position(|r| *r == s.router)
            .ok_or_else(|| Nat64Error::UnknownRouter { router: router() })?;
        let value = s.prefix.as_deref().unwrap_or(WELL_KNOWN_PREFIX);
        let bad = || Nat64Error::BadPrefix {
            router: router(),
            value: value.to_string(),
        };
        let (addr, len) = value.split_once('/').ok_or_else(bad)?;
        let addr = u128::from(addr.parse::<Ipv6Addr>().map_err(|_| bad())?);
        if len != "96" || addr & 0xffff_ffff != 0 {
            return Err(bad());
        }
        if s.pool.is_empty() {
            return Err(Nat64Error::EmptyPool { router: router() });
        }
        let (min, max) = (s.port_min.unwrap_or(1024), s.port_max.unwrap_or(65535));
        if min > max || min == 0 {
            return Err(Nat64Error::PortRangeOutOfOrder {
                router: router(),
                min,
                max,
            });
        }
        let mut pool = Vec::with_capacity(s.pool.len());
        for v in &s.pool {
            let ip: Ipv4Addr = v.parse().map_err(|_| Nat64Error::PoolNotIpv4 {
                router: router(),
                value: v.clone(),
            })?;
            let rid32 = u32::try_from(rid).unwrap_or(u32::MAX);
            let Some(sw) = switches
                .iter_mut()
                .find(|sw| sw.gateway.is_some_and(|g| g.router == rid32) && sw.subnet.contains(ip))
            else {
                return Err(Nat64Error::PoolOffRouter {
                    router: router(),
                    ip,
                });
            };
            let Some(gw) = sw.gateway else {
                return Err(Nat64Error::PoolOffRouter {
                    router: router(),
                    ip,
                });
            };
            if sw.arp.contains_key(&u32::from(ip)) || pool.contains(&ip) {
                return Err(Nat64Error::PoolInUse {
                    router: router(),
                    ip,
                });
            }
            sw.arp.insert(u32::from(ip), gw.mac);
            pool.push(ip);
        }
        let slot = out
            .get_mut(rid)
            .ok_or_else(|| Nat64Error::UnknownRouter { router: router() })?;
        if slot.is_some() {
            return Err(Nat64Error::Duplicate { router: router() });
        }
        *slot = Some(Nat64 {
            prefix: addr,
            pool,
            ports: (min, max),
            zone: crate::security::zone_id("nat64", &s.router),
        });
    }
    Ok(out)
}

fn be16(buf: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(off)?, *buf.get(off + 1)?]))
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) -> Option<()> {
    buf.get_mut(off..off.checked_add(bytes.len())?)?
        .copy_from_slice(bytes);
    Some(())
}

/// Offset of the "port" a translation rewrites: the source port (or the
/// echo identifier) towards IPv4, the destination port towards IPv6.
fn port_offset(proto4: u8, towards_v4: bool) -> usize {
    match (proto4, towards_v4) {
        (IPPROTO_ICMP, _) => 4,
        (_, true) => 0,
        (_, false) => 2,
    }
}

/// Recomputes the L4 checksum of `seg` (TCP, UDP, ICMP, ICMPv6) with the
/// given pseudo-header sum (0 for ICMP).
// hot path (NAT64 packets): one pass over the segment.
fn fix_l4_checksum(seg: &mut [u8], proto: u8, pseudo: u32) -> Option<()> {
    let at = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => 2,
    };
    put(seg, at, &[0, 0])?;
    let mut c = finish(accumulate(pseudo, seg));
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    put(seg, at, &c.to_be_bytes())
}

/// The IPv6 pseudo-header (RFC 8200 8.1) as bytes.
fn pseudo6(src: &[u8; 16], dst: &[u8; 16], len: usize, next: u8) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[..16].copy_from_slice(src);
    p[16..32].copy_from_slice(dst);
    p[32..36].copy_from_slice(&u32::try_from(len).unwrap_or(0).to_be_bytes());
    p[39] = next;
    p
}

/// How a translated segment's checksum coverage changes besides its port.
struct L4Change<'a> {
    /// Pseudo-header bytes covered before / after (16-bit aligned).
    old_ps: &'a [u8],
    new_ps: &'a [u8],
    /// ICMP ⇄ ICMPv6 echo type.
    new_type: Option<u8>,
}

/// Writes the new port (or echo identifier) and type of a translated
/// segment and updates its checksum incrementally (RFC 1624), so the
/// payload is not read. A UDP datagram without checksum (IPv4 allows it)
/// gets a full one over `full_pseudo`, as IPv6 requires.
// hot path (NAT64 packets): a few 16-bit sums.
fn rewrite_l4(
    seg: &mut [u8],
    proto_in: u8,
    port_at: usize,
    port: u16,
    change: &L4Change<'_>,
    full_pseudo: u32,
) -> Option<()> {
    let csum_at = match proto_in {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => 2,
    };
    let old_port = be16(seg, port_at)?;
    let csum = be16(seg, csum_at)?;
    put(seg, port_at, &port.to_be_bytes())?;
    // Word 0 is the source port of TCP/UDP (already accounted for above):
    // read it after the port write so only the ICMP type change counts.
    let old_word0 = [*seg.first()?, *seg.get(1)?];
    if let Some(t) = change.new_type {
        put(seg, 0, &[t])?;
    }
    if proto_in == IPPROTO_UDP && csum == 0 {
        return fix_l4_checksum(seg, IPPROTO_UDP, full_pseudo);
    }
    let new_word0 = [*seg.first()?, *seg.get(1)?];
    let mut c = adjust(csum, change.old_ps, change.new_ps);
    c = adjust(c, &old_port.to_be_bytes(), &port.to_be_bytes());
    c = adjust(c, &old_word0, &new_word0);
    if proto_in == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    put(seg, csum_at, &c.to_be_bytes())
}

fn pick_pool(n: &Nat64, client: u128) -> Option<Ipv4Addr> {
    let mut h = crate::fastmap::FastHasher::default();
    h.write_u128(client);
    let len = n.pool.len().max(1) as u64;
    n.pool
        .get(usize::try_from(h.finish() % len).unwrap_or(0))
        .copied()
}

/// Translates an IPv6 packet to `prefix + IPv4` into IPv4, creating the
/// session on its first packet. On `Ok` the frame in `buf[..*len]` is IPv4.
#[allow(clippy::too_many_arguments)]
pub fn to_v4<T: Tracer>(
    n: &Nat64,
    st: &mut WorkerState,
    generation: u64,
    p: &Parsed,
    ip6: &Ipv6Info,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Result<(), DropReason> {
    let l3 = p.l3_offset;
    let proto4 = match ip6.next_header {
        IPPROTO_TCP => IPPROTO_TCP,
        IPPROTO_UDP => IPPROTO_UDP,
        IPPROTO_ICMPV6 if buf.get(p.l4_offset) == Some(&128) => IPPROTO_ICMP,
        other => {
            tr.note("nat64", || {
                format!("drop: next header {other} is not translated")
            });
            return Err(DropReason::Nat64Unsupported);
        }
    };
    if p.l4_offset != l3 + 40 {
        return Err(DropReason::Nat64Unsupported);
    }
    let Some(x) = extract(p, buf.get(..*len).unwrap_or(&[])) else {
        return Err(DropReason::Nat64Unsupported);
    };
    let server = Ipv4Addr::from(u32::try_from(u128::from(ip6.dst) & 0xffff_ffff).unwrap_or(0));
    if n.owns(server) {
        tr.note("nat64", || format!("drop: {server} is a pool address"));
        return Err(DropReason::Nat64Unsupported);
    }
    let key = x.key.in_zone(n.zone);
    let shard = st.shard;
    let ct = &mut st.ct;
    let (pool, port, new) = match ct.lookup(&key) {
        Some(f) if f.dir == Dir::Original => {
            let Some(c) = ct.get(f.id) else {
                return Err(DropReason::CtInvalid);
            };
            let (Some(pool), port) = (key::to_v4(c.reply.dst), c.reply.dport) else {
                return Err(DropReason::CtInvalid);
            };
            if ct
                .update(f.id, Dir::Original, key.proto, x.tcp.as_ref())
                .is_err()
            {
                return Err(DropReason::CtInvalid);
            }
            (pool, port, false)
        }
        Some(_) => return Err(DropReason::CtInvalid),
        None => {
            if x.tcp.is_some_and(|s| !TcpState::may_start(&s)) {
                tr.note("nat64", || {
                    "drop: TCP segment cannot start a session".into()
                });
                return Err(DropReason::CtInvalid);
            }
            let Some(pool) = pick_pool(n, key.src) else {
                return Err(DropReason::NatPortsExhausted);
            };
            let (min, max) = n.ports;
            let span = u32::from(max - min) + 1;
            let mut h = crate::fastmap::FastHasher::default();
            h.write_u128(key.src);
            h.write_u16(key.sport);
            let seed = u32::try_from(h.finish() >> 32).unwrap_or(0);
            let echo = proto4 == IPPROTO_ICMP;
            let mut chosen = None;
            // Only ports whose replies steer back to this worker ([`crate::steer`]).
            let tries = PORT_TRIES.saturating_mul(u32::try_from(st.shard.count).unwrap_or(1));
            for i in 0..tries {
                let cand = if i == 0 && (min..=max).contains(&key.sport) {
                    key.sport
                } else {
                    let off = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % span;
                    min.saturating_add(u16::try_from(off).unwrap_or(0))
                };
                let reply = Key {
                    src: from_v4(server),
                    dst: from_v4(pool),
                    zone: n.zone,
                    sport: if echo { cand } else { key.dport },
                    dport: cand,
                    proto: proto4,
                };
                if shard.owns_raw(&reply) && !ct.key_in_use(&reply) {
                    chosen = Some((cand, reply));
                    break;
                }
            }
            let Some((port, reply)) = chosen else {
                tr.note("nat64", || format!("drop: no free port on {pool}"));
                return Err(DropReason::NatPortsExhausted);
            };
            let id = match ct.create(key, reply, generation) {
                Ok(id) => id,
                Err(CreateError::TableFull) => return Err(DropReason::CtTableFull),
                Err(CreateError::KeyInUse) => return Err(DropReason::CtInvalid),
            };
            if ct
                .update(id, Dir::Original, key.proto, x.tcp.as_ref())
                .is_err()
            {
                ct.remove(id);
                return Err(DropReason::CtInvalid);
            }
            (pool, port, true)
        }
    };

    // Rewrite in place: a 20-byte IPv4 header replaces the 40-byte IPv6 one.
    let payload = usize::from(be16(buf, l3 + 4).ok_or(DropReason::MalformedIpv6)?);
    let l4 = l3 + 40;
    if l4 + payload > *len {
        return Err(DropReason::MalformedIpv6);
    }
    let tc = buf
        .get(l3..l3 + 2)
        .map_or(0, |b| ((b[0] & 0x0f) << 4) | (b[1] >> 4));
    buf.copy_within(l4..l4 + payload, l3 + 20);
    let total = u16::try_from(20 + payload).map_err(|_| DropReason::Oversize)?;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = tc;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = ip6.hop_limit;
    h[9] = proto4;
    h[12..16].copy_from_slice(&pool.octets());
    h[16..20].copy_from_slice(&server.octets());
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let seg_start = l3 + 20;
    let seg = buf
        .get_mut(seg_start..seg_start + payload)
        .ok_or(DropReason::MalformedIpv6)?;
    let (src6, dst6) = (ip6.src.octets(), ip6.dst.octets());
    let mut addrs6 = [0u8; 32];
    addrs6[..16].copy_from_slice(&src6);
    addrs6[16..].copy_from_slice(&dst6);
    let mut addrs4 = [0u8; 8];
    addrs4[..4].copy_from_slice(&pool.octets());
    addrs4[4..].copy_from_slice(&server.octets());
    let change = if proto4 == IPPROTO_ICMP {
        // ICMPv6 covers a pseudo-header, ICMP none; echo request 128 → 8.
        L4Change {
            old_ps: &pseudo6(&src6, &dst6, payload, IPPROTO_ICMPV6),
            new_ps: &[],
            new_type: Some(8),
        }
    } else {
        // Upper-layer length and protocol sum alike in both pseudo-headers.
        L4Change {
            old_ps: &addrs6,
            new_ps: &addrs4,
            new_type: None,
        }
    };
    let full = pseudo(&pool.octets(), &server.octets(), proto4, payload);
    rewrite_l4(seg, proto4, port_offset(proto4, true), port, &change, full)
        .ok_or(DropReason::MalformedL4)?;
    put(buf, l3, &h).ok_or(DropReason::MalformedIpv6)?;
    put(buf, l3 - 2, &0x0800u16.to_be_bytes()).ok_or(DropReason::MalformedIpv6)?;
    *len = seg_start + payload;
    tr.note("nat64", || {
        format!(
            "{} session: [{}]:{} → [{}]:{} becomes {pool}:{port} → {server}:{}",
            if new { "new" } else { "tracked" },
            ip6.src,
            key.sport,
            ip6.dst,
            key.dport,
            key.dport
        )
    });
    Ok(())
}

/// Translates an IPv4 packet to a pool address back into IPv6 for the
/// session it belongs to. On `Ok` the frame in `buf[..*len]` is IPv6.
#[allow(clippy::too_many_arguments)]
pub fn to_v6<T: Tracer>(
    n: &Nat64,
    st: &mut WorkerState,
    p: &Parsed,
    ip: &Ipv4Info,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Result<(), DropReason> {
    let l3 = p.l3_offset;
    let icmp_type = buf.get(p.l4_offset).copied();
    if ip.proto == IPPROTO_ICMP && matches!(icmp_type, Some(3 | 11)) && ip.header_len == 20 {
        return error_to_v6(n, st, p, ip, buf, len, tr);
    }
    let echo_reply = ip.proto == IPPROTO_ICMP && icmp_type == Some(0);
    let more_fragments = buf.get(l3 + 6).is_some_and(|b| b & 0x20 != 0);
    if !(ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP || echo_reply)
        || ip.header_len != 20
        || ip.later_fragment
        || more_fragments
    {
        tr.note("nat64", || {
            format!(
                "drop: IPv4 proto {} to pool address {} is not translated",
                ip.proto, ip.dst
            )
        });
        return Err(DropReason::Nat64Unsupported);
    }
    let Some(x) = extract(p, buf.get(..*len).unwrap_or(&[])) else {
        return Err(DropReason::Nat64Unsupported);
    };
    let key = x.key.in_zone(n.zone);
    let ct = &mut st.ct;
    let Some(f) = ct.lookup(&key).filter(|f| f.dir == Dir::Reply) else {
        tr.note("nat64", || {
            format!(
                "drop: no session for {}:{} → {}:{}",
                ip.src, key.sport, ip.dst, key.dport
            )
        });
        return Err(DropReason::Nat64NoSession);
    };
    let Some(orig) = ct.get(f.id).map(|c| c.orig) else {
        return Err(DropReason::CtInvalid);
    };
    if ct
        .update(f.id, Dir::Reply, key.proto, x.tcp.as_ref())
        .is_err()
    {
        return Err(DropReason::CtInvalid);
    }
    let client = Ipv6Addr::from(orig.src);
    let server6 = Ipv6Addr::from(n.prefix | u128::from(u32::from(ip.src)));
    if n.embeds(client) {
        return Err(DropReason::Nat64Unsupported);
    }
    let proto6 = if ip.proto == IPPROTO_ICMP {
        IPPROTO_ICMPV6
    } else {
        ip.proto
    };

    // Rewrite in place: a 40-byte IPv6 header replaces the 20-byte IPv4 one.
    let payload = ip.total_len.saturating_sub(20);
    let from = l3 + 20;
    let end = l3 + 40 + payload;
    if from + payload > *len || end > buf.len() {
        return Err(DropReason::Oversize);
    }
    let tos = buf.get(l3 + 1).copied().unwrap_or(0);
    buf.copy_within(from..from + payload, l3 + 40);
    let mut h = [0u8; 40];
    h[0] = 0x60 | (tos >> 4);
    h[1] = (tos & 0x0f) << 4;
    h[4..6].copy_from_slice(&u16::try_from(payload).unwrap_or(0).to_be_bytes());
    h[6] = proto6;
    h[7] = ip.ttl;
    h[8..24].copy_from_slice(&server6.octets());
    h[24..40].copy_from_slice(&client.octets());
    let seg = buf.get_mut(l3 + 40..end).ok_or(DropReason::Oversize)?;
    let (s6, c6) = (server6.octets(), client.octets());
    let mut addrs6 = [0u8; 32];
    addrs6[..16].copy_from_slice(&s6);
    addrs6[16..].copy_from_slice(&c6);
    let mut addrs4 = [0u8; 8];
    addrs4[..4].copy_from_slice(&ip.src.octets());
    addrs4[4..].copy_from_slice(&ip.dst.octets());
    let change = if proto6 == IPPROTO_ICMPV6 {
        // Echo reply 0 → 129, now covered by the IPv6 pseudo-header.
        L4Change {
            old_ps: &[],
            new_ps: &pseudo6(&s6, &c6, payload, IPPROTO_ICMPV6),
            new_type: Some(129),
        }
    } else {
        L4Change {
            old_ps: &addrs4,
            new_ps: &addrs6,
            new_type: None,
        }
    };
    let full = pseudo(&s6, &c6, proto6, payload);
    rewrite_l4(
        seg,
        ip.proto,
        port_offset(ip.proto, false),
        orig.sport,
        &change,
        full,
    )
    .ok_or(DropReason::MalformedL4)?;
    put(buf, l3, &h).ok_or(DropReason::Oversize)?;
    put(buf, l3 - 2, &0x86ddu16.to_be_bytes()).ok_or(DropReason::Oversize)?;
    *len = end;
    tr.note("nat64", || {
        format!(
            "session reply {}:{} → {}:{} becomes [{server6}]:{} → [{client}]:{}",
            ip.src, key.sport, ip.dst, key.dport, key.sport, orig.sport
        )
    });
    Ok(())
}

/// The one's-complement sum of `data`, folded to 16 bits (not complemented).
fn fold(data: &[u8]) -> u16 {
    !finish(accumulate(0, data))
}

/// RFC 1624 eqn. 3 over byte strings: the checksum after `old` (as a
/// whole, 16-bit aligned) was replaced by `new` in the covered data.
fn adjust(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut s = u32::from(!csum) + u32::from(!fold(old)) + u32::from(fold(new));
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !u16::try_from(s).unwrap_or(u16::MAX)
}

/// RFC 7915 4.2: the ICMPv6 type, code and parameter for an ICMPv4 error,
/// `None` when it has no translation.
fn icmp_error_6(ty: u8, code: u8, mtu4: u16) -> Option<(u8, u8, u32)> {
    match (ty, code) {
        (3, 0 | 1 | 5..=8 | 11 | 12) => Some((1, 0, 0)),
        (3, 2) => Some((4, 1, 6)),
        (3, 3) => Some((1, 4, 0)),
        (3, 4) => Some((2, 0, u32::from(mtu4).saturating_add(20).max(1280))),
        (3, 9 | 10 | 13 | 15) => Some((1, 1, 0)),
        (11, c @ (0 | 1)) => Some((3, c, 0)),
        _ => None,
    }
}

/// Largest ICMPv6 error packet (RFC 4443 2.4(c)): the IPv6 minimum MTU.
const ICMPV6_ERROR_MAX: usize = 1280;

/// Translates an ICMPv4 error about a NAT64 session into the ICMPv6 error
/// its IPv6 client expects (RFC 7915 4.2), quoted packet included.
#[allow(clippy::too_many_arguments)]
fn error_to_v6<T: Tracer>(
    n: &Nat64,
    st: &mut WorkerState,
    p: &Parsed,
    ip: &Ipv4Info,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Result<(), DropReason> {
    let l3 = p.l3_offset;
    let icmp = l3 + 20;
    let (Some(&ty), Some(&code)) = (buf.get(icmp), buf.get(icmp + 1)) else {
        return Err(DropReason::MalformedL4);
    };
    let mtu4 = be16(buf, icmp + 6).unwrap_or(0);
    let Some((ty6, code6, param)) = icmp_error_6(ty, code, mtu4) else {
        tr.note("nat64", || {
            format!("drop: ICMP type {ty} code {code} has no ICMPv6 form")
        });
        return Err(DropReason::Nat64Unsupported);
    };
    let Some(quoted) = extract(p, buf.get(..*len).unwrap_or(&[])).and_then(|x| x.related) else {
        return Err(DropReason::Nat64Unsupported);
    };
    let Some(f) = st
        .ct
        .lookup(&quoted.reversed().in_zone(n.zone))
        .filter(|f| f.dir == Dir::Reply)
    else {
        tr.note("nat64", || "drop: ICMP error about no session".into());
        return Err(DropReason::Nat64NoSession);
    };
    let Some(orig) = st.ct.get(f.id).map(|c| c.orig) else {
        return Err(DropReason::CtInvalid);
    };
    let inner = icmp + 8;
    let inner_ihl = usize::from(buf.get(inner).ok_or(DropReason::MalformedL4)? & 0x0f) * 4;
    let inner_total = usize::from(be16(buf, inner + 2).ok_or(DropReason::MalformedL4)?);
    let inner_ttl = *buf.get(inner + 8).ok_or(DropReason::MalformedL4)?;
    let inner_l4 = inner + inner_ihl;
    if inner_ihl < 20 || inner_l4 > ip.total_len + l3 {
        return Err(DropReason::MalformedL4);
    }
    let quoted_l4 = (l3 + ip.total_len).saturating_sub(inner_l4);
    // The new packet: IPv6 40 + ICMPv6 8 + quoted IPv6 40 + quoted L4, ≤ 1280.
    let l4_kept = quoted_l4.min(ICMPV6_ERROR_MAX - 88);
    let end = l3 + 88 + l4_kept;
    if inner_l4 + l4_kept > *len || end > buf.len() {
        return Err(DropReason::Oversize);
    }
    let client = Ipv6Addr::from(orig.src);
    let server6 = Ipv6Addr::from(orig.dst);
    let from6 = Ipv6Addr::from(n.prefix | u128::from(u32::from(ip.src)));
    let inner_proto = quoted.proto;
    let inner_proto6 = if inner_proto == IPPROTO_ICMP {
        IPPROTO_ICMPV6
    } else {
        inner_proto
    };
    let (Some(pool), Some(server)) = (key::to_v4(quoted.src), key::to_v4(quoted.dst)) else {
        return Err(DropReason::CtInvalid);
    };
    buf.copy_within(inner_l4..inner_l4 + l4_kept, l3 + 88);
    // The quoted transport header: the client's port, checksum updated.
    {
        let q = buf.get_mut(l3 + 88..end).ok_or(DropReason::Oversize)?;
        let port_at = port_offset(inner_proto, true);
        let old_port = be16(q, port_at).unwrap_or(0);
        let _ = put(q, port_at, &orig.sport.to_be_bytes());
        let csum_at = match inner_proto {
            IPPROTO_TCP => Some(16),
            IPPROTO_UDP => Some(6),
            _ => None,
        };
        if let Some(at) = csum_at {
            if let Some(c) = be16(q, at).filter(|c| *c != 0) {
                let mut old = [0u8; 10];
                old[..4].copy_from_slice(&pool.octets());
                old[4..8].copy_from_slice(&server.octets());
                old[8..10].copy_from_slice(&old_port.to_be_bytes());
                let mut new = [0u8; 34];
                new[..16].copy_from_slice(&client.octets());
                new[16..32].copy_from_slice(&server6.octets());
                new[32..34].copy_from_slice(&orig.sport.to_be_bytes());
                let _ = put(q, at, &adjust(c, &old, &new).to_be_bytes());
            }
        } else if inner_proto == IPPROTO_ICMP {
            // The quoted echo request, as the client sent it (type 128).
            let _ = put(q, 0, &[128]);
        }
    }
    let mut quoted6 = [0u8; 40];
    quoted6[0] = 0x60;
    quoted6[4..6].copy_from_slice(
        &u16::try_from(inner_total.saturating_sub(inner_ihl))
            .unwrap_or(0)
            .to_be_bytes(),
    );
    quoted6[6] = inner_proto6;
    quoted6[7] = inner_ttl;
    quoted6[8..24].copy_from_slice(&client.octets());
    quoted6[24..40].copy_from_slice(&server6.octets());
    put(buf, l3 + 48, &quoted6).ok_or(DropReason::Oversize)?;
    let icmp_len = 8 + 40 + l4_kept;
    let mut h6 = [0u8; 8];
    h6[0] = ty6;
    h6[1] = code6;
    h6[4..8].copy_from_slice(&param.to_be_bytes());
    put(buf, l3 + 40, &h6).ok_or(DropReason::Oversize)?;
    let msg = buf.get_mut(l3 + 40..end).ok_or(DropReason::Oversize)?;
    let ps = pseudo(&from6.octets(), &client.octets(), IPPROTO_ICMPV6, icmp_len);
    fix_l4_checksum(msg, IPPROTO_ICMPV6, ps).ok_or(DropReason::MalformedL4)?;
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&u16::try_from(icmp_len).unwrap_or(0).to_be_bytes());
    h[6] = IPPROTO_ICMPV6;
    h[7] = ip.ttl;
    h[8..24].copy_from_slice(&from6.octets());
    h[24..40].copy_from_slice(&client.octets());
    put(buf, l3, &h).ok_or(DropReason::Oversize)?;
    put(buf, l3 - 2, &0x86ddu16.to_be_bytes()).ok_or(DropReason::Oversize)?;
    *len = end;
    tr.note("nat64", || {
        format!(
            "ICMP type {ty} code {code} from {} → ICMPv6 type {ty6} code {code6} to [{client}]",
            ip.src
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile as compile_all, ConfigError};
    use crate::pipeline::{process, Learned, NoTrace, RecordTrace, Verdict};
    use crate::testutil::{interfaces, topology};

    const VM2: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const VM3: [u8; 6] = [2, 0, 0, 0, 0, 3];
    const GW_A: [u8; 6] = [2, 0, 0, 0, 0xff, 1];
    const GW_B: [u8; 6] = [2, 0, 0, 0, 0xff, 2];

    fn spec(pool: &str, prefix: Option<&str>) -> Nat64Spec {
        Nat64Spec {
            router: "r".into(),
            prefix: prefix.map(Into::into),
            pool: vec![pool.into()],
            port_min: None,
            port_max: None,
        }
    }

    fn tables(n: Vec<Nat64Spec>) -> Result<crate::tables::Tables, ConfigError> {
        let mut s = topology();
        s.nat64 = n;
        compile_all(&s, &interfaces(), 1)
    }

    /// vm2 (fd00:1::11) → 64:ff9b::10.0.2.10, UDP 40000 → 53, hop limit 64.
    fn udp6() -> Vec<u8> {
        let payload = b"query";
        let ulen = 8 + payload.len();
        let src: Ipv6Addr = "fd00:1::11".parse().unwrap();
        let dst: Ipv6Addr = "64:ff9b::a00:20a".parse().unwrap();
        let mut f = Vec::new();
        f.extend_from_slice(&GW_A);
        f.extend_from_slice(&VM2);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x6b, 0x80, 0, 0]); // traffic class 0xb8
        f.extend_from_slice(&u16::try_from(ulen).unwrap().to_be_bytes());
        f.extend_from_slice(&[IPPROTO_UDP, 64]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        let mut udp = Vec::new();
        udp.extend_from_slice(&40000u16.to_be_bytes());
        udp.extend_from_slice(&53u16.to_be_bytes());
        udp.extend_from_slice(&u16::try_from(ulen).unwrap().to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let c = finish(accumulate(
            pseudo(&src.octets(), &dst.octets(), IPPROTO_UDP, ulen),
            &udp,
        ));
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&udp);
        f
    }

    fn run(t: &crate::tables::Tables, l: &mut Learned, port: u16, f: &[u8]) -> (Verdict, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[..f.len()].copy_from_slice(f);
        let mut len = f.len();
        let d = process(t, l, port, &mut buf, &mut len, &mut NoTrace);
        buf.truncate(len);
        (d.verdict, buf)
    }

    #[test]
    fn bad_nat64_configs_are_rejected_precisely() {
        let e = tables(vec![spec("10.0.2.100", Some("64:ff9b::/64"))]).unwrap_err();
        assert!(
            matches!(e, ConfigError::Nat64(Nat64Error::BadPrefix { .. })),
            "{e}"
        );
        let e = tables(vec![spec("fd00::1", None)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NAT64 on router \"r\": pool address \"fd00::1\" is not IPv4"
        );
        let e = tables(vec![spec("192.168.9.9", None)]).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Nat64(Nat64Error::PoolOffRouter { .. })
        ));
        let e = tables(vec![spec("10.0.2.10", None)]).unwrap_err();
        assert!(
            matches!(e, ConfigError::Nat64(Nat64Error::PoolInUse { .. })),
            "bound to vm3"
        );
        let mut s = spec("10.0.2.100", None);
        s.port_min = Some(2000);
        s.port_max = Some(1000);
        assert!(matches!(
            tables(vec![s]).unwrap_err(),
            ConfigError::Nat64(Nat64Error::PortRangeOutOfOrder { .. })
        ));
    }

    /// With two workers, the pool port is chosen so the IPv4 reply steers
    /// to the worker holding the session.
    #[test]
    fn replies_steer_to_the_worker_holding_the_session() {
        use crate::steer::{frame_worker, Shard};
        let t = tables(vec![spec("10.0.2.100", None)]).unwrap();
        for index in 0..2 {
            let mut l = Learned::new(16);
            l.stateful.shard = Shard { index, count: 2 };
            let (v, out) = run(&t, &mut l, 1, &udp6());
            assert_eq!(v, Verdict::Unicast { port: 2 });
            let pool_port = u16::from_be_bytes([out[34], out[35]]);
            let ps = pseudo(&out[26..30], &out[30..34], IPPROTO_UDP, out.len() - 34);
            assert_eq!(
                finish(accumulate(ps, &out[34..])),
                0,
                "UDP checksum, pool port {pool_port}"
            );
            let mut reply = crate::packet::build::udp64(
                GW_B,
                VM3,
                "10.0.2.10".parse().unwrap(),
                "10.0.2.100".parse().unwrap(),
            );
            reply[34..36].copy_from_slice(&53u16.to_be_bytes());
            reply[36..38].copy_from_slice(&pool_port.to_be_bytes());
            reply[40..42].copy_from_slice(&[0, 0]);
            assert_eq!(frame_worker(&t, &reply, 2), index, "pool port {pool_port}");
            assert_eq!(run(&t, &mut l, 2, &reply).0, Verdict::Unicast { port: 1 });
        }
    }

    #[test]
    fn udp_is_translated_both_ways_with_valid_checksums() {
        let t = tables(vec![spec("10.0.2.100", None)]).unwrap();
        let mut l = Learned::new(16);
        let mut tr = RecordTrace::default();
        let f = udp6();
        let mut buf = vec![0u8; 2048];
        buf[..f.len()].copy_from_slice(&f);
        let mut len = f.len();
        let d = process(&t, &mut l, 1, &mut buf, &mut len, &mut tr);
        assert_eq!(d.verdict, Verdict::Unicast { port: 2 }, "{:?}", tr.steps);
        assert!(tr.steps.iter().any(|s| s.stage == "nat64"));
        let out = &buf[..len];
        assert_eq!(len, f.len() - 20);
        assert_eq!(&out[0..6], &VM3);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        let ip = &out[14..34];
        assert_eq!(internet_checksum(ip), 0);
        assert_eq!(ip[1], 0xb8, "traffic class → TOS");
        assert_eq!(ip[8], 63, "hop limit 64 → TTL, decremented by the router");
        assert_eq!(&ip[12..16], &[10, 0, 2, 100]);
        assert_eq!(&ip[16..20], &[10, 0, 2, 10]);
        let udp = &out[34..];
        let ps = pseudo(&ip[12..16], &ip[16..20], IPPROTO_UDP, udp.len());
        assert_eq!(
            finish(accumulate(ps, udp)),
            0,
            "UDP checksum over the IPv4 pseudo-header"
        );
        let pool_port = u16::from_be_bytes([udp[0], udp[1]]);
        assert_eq!(pool_port, 40000, "the client's port is kept when free");

        // The server's answer: 10.0.2.10:53 → 10.0.2.100:40000, without a UDP checksum.
        let mut reply = crate::packet::build::udp64(
            GW_B,
            VM3,
            "10.0.2.10".parse().unwrap(),
            "10.0.2.100".parse().unwrap(),
        );
        reply[34..36].copy_from_slice(&53u16.to_be_bytes());
        reply[36..38].copy_from_slice(&pool_port.to_be_bytes());
        reply[40..42].copy_from_slice(&[0, 0]);
        // Once without a UDP checksum (a full one is computed), once with
        // one (updated incrementally): both verify over the IPv6 pseudo-header.
        let mut summed = reply.clone();
        let ps = pseudo(
            &summed[26..30],
            &summed[30..34],
            IPPROTO_UDP,
            summed.len() - 34,
        );
        let c = finish(accumulate(ps, &summed[34..]));
        summed[40..42].copy_from_slice(&c.to_be_bytes());
        let (_, out) = run(&t, &mut l, 2, &summed);
        let ps = pseudo(&out[22..38], &out[38..54], IPPROTO_UDP, out.len() - 54);
        assert_eq!(
            finish(accumulate(ps, &out[54..])),
            0,
            "incremental UDP checksum"
        );
        let (v, out) = run(&t, &mut l, 2, &reply);
        assert_eq!(v, Verdict::Unicast { port: 1 });
        assert_eq!(&out[0..6], &VM2);
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        let ip6 = &out[14..54];
        assert_eq!(ip6[6], IPPROTO_UDP);
        let src: Ipv6Addr = <[u8; 16]>::try_from(&ip6[8..24]).unwrap().into();
        let dst: Ipv6Addr = <[u8; 16]>::try_from(&ip6[24..40]).unwrap().into();
        assert_eq!(src, "64:ff9b::a00:20a".parse::<Ipv6Addr>().unwrap());
        assert_eq!(dst, "fd00:1::11".parse::<Ipv6Addr>().unwrap());
        let udp = &out[54..];
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 40000);
        let ps = pseudo(&ip6[8..24], &ip6[24..40], IPPROTO_UDP, udp.len());
        assert_ne!(&udp[6..8], &[0, 0], "IPv6 UDP always has a checksum");
        assert_eq!(finish(accumulate(ps, udp)), 0);

        // The server's ICMP port unreachable about the translated datagram
        // (quoting all of it) becomes ICMPv6 port unreachable, whose quoted
        // IPv6/UDP datagram is what the client sent.
        // The same session's next datagram, as the server receives it.
        let (_, v4) = run(&t, &mut l, 1, &f);
        let quoted = &v4[14..];
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quoted);
        let c = internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let err = crate::packet::build::ipv4(
            GW_B,
            VM3,
            None,
            "10.0.2.10".parse().unwrap(),
            "10.0.2.100".parse().unwrap(),
            64,
            IPPROTO_ICMP,
            &icmp,
        );
        let (v, out) = run(&t, &mut l, 2, &err);
        assert_eq!(v, Verdict::Unicast { port: 1 });
        let ip6 = &out[14..54];
        assert_eq!(ip6[6], IPPROTO_ICMPV6);
        let msg = &out[54..];
        assert_eq!((msg[0], msg[1]), (1, 4), "ICMPv6 port unreachable");
        let ps = pseudo(&ip6[8..24], &ip6[24..40], IPPROTO_ICMPV6, msg.len());
        assert_eq!(finish(accumulate(ps, msg)), 0, "ICMPv6 checksum");
        let q6 = &msg[8..48];
        assert_eq!(&q6[8..24], &f[22..38], "quoted source: the client");
        assert_eq!(
            &q6[24..40],
            &f[38..54],
            "quoted destination: prefix + server"
        );
        let qudp = &msg[48..];
        assert_eq!(
            qudp,
            &f[54..],
            "the quoted datagram is the one the client sent"
        );

        // Unsolicited IPv4 to the pool: no session.
        reply[36..38].copy_from_slice(&40001u16.to_be_bytes());
        let (v, _) = run(&t, &mut l, 2, &reply);
        assert_eq!(v, Verdict::Drop(DropReason::Nat64NoSession));
    }
}
