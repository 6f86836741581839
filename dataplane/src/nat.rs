//! The router's stateful stage: SNAT, DNAT port forwarding, floating IPs
//! (`dnat_and_snat`) and the router firewall, tracked in the router's
//! conntrack zone.
//!
//! # Design
//!
//! - **Before routing** ([`pre_route`]): a packet of a tracked connection is
//!   translated to the tuple the connection's other direction expects (the
//!   reply tuple reversed, or the original reversed for replies): one generic
//!   rewrite covers SNAT, DNAT and floating IPs in both directions. The first
//!   packet of a connection is matched against DNAT rules and its destination
//!   rewritten, so routing sees the internal address.
//! - **After routing** ([`post_route`]): firewall rules see the routed
//!   (post-DNAT) tuple; a connection leaving through the router's external
//!   switch gets SNAT (floating IPs first: longest logical prefix wins). SNAT
//!   ports are picked per connection in the rule's range: the original port
//!   if free, then hash-chosen candidates, each checked against the table for
//!   a free reply tuple (Linux's approach: no pool state, and a port is
//!   reused as soon as its connection expires). Exhaustion drops the packet
//!   and counts `nat_ports_exhausted`.
//! - **ICMP errors** about a tracked packet (port unreachable, TTL exceeded,
//!   fragmentation needed) are related through the tuple they quote; the
//!   quoted header is restored to what its sender sent and the outer
//!   addresses follow, so the sender's socket gets the error.
//! - **Checksums** are updated incrementally (RFC 1624) for the IPv4 header
//!   and the L4 pseudo-header (TCP, UDP with a checksum) and for ports / the
//!   ICMP echo identifier.
//! - The external switch is the router's switch whose subnet holds the NAT
//!   rule's external IP; floating and DNAT addresses other than the gateway's
//!   are answered by the ARP responder with the router port's MAC.
//!
//! # Assumptions / not yet
//!
//! IPv4 only (IPv6 NAT is not implemented; IPv6 routed traffic bypasses
//! this stage; NAT64 is [`crate::nat64`]). No hairpin (a VM
//! reaching its own floating IP from inside). Non-first fragments are not
//! translated.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;

use crate::conntrack::key::{extract, from_v4, show};
use crate::conntrack::{CreateError, Dir, Key};
use crate::counters::DropReason;
use crate::model::{DesiredState, NatKind, RuleAction};
use crate::packet::checksum::update16;
use crate::packet::headers::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::packet::Parsed;
use crate::pipeline::Tracer;
use crate::security::{parse_cidr, parse_protocol, port_range, zone_id, RuleName, SecurityError};
use crate::stateful::WorkerState;
use crate::tables::{SwitchId, Tables};

/// Why NAT or firewall rules were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    #[error("{owner}: unknown router {router:?}")]
    UnknownRouter { owner: String, router: String },
    #[error("{owner}: bad IPv4 address or CIDR {value:?} (IPv6 NAT is not supported)")]
    BadAddress { owner: String, value: String },
    #[error("{owner}: external IP {ip} is on none of the router's subnets")]
    ExternalIpOffRouter { owner: String, ip: Ipv4Addr },
    #[error("{owner}: external IP {ip} is bound to a port")]
    ExternalIpInUse { owner: String, ip: Ipv4Addr },
    #[error(
        "{owner}: port forwarding needs protocol tcp/udp and both external_port and logical_port"
    )]
    IncompletePortForward { owner: String },
    #[error("{owner}: SNAT port range {min}..={max} is empty")]
    PortRangeOutOfOrder { owner: String, min: u16, max: u16 },
    #[error("{owner}: {ip} is forwarded twice")]
    DuplicateDnat { owner: String, ip: String },
    #[error(transparent)]
    Rule(#[from] SecurityError),
}

/// A destination translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    pub external: u128,
    /// Port forwarding: protocol and ports; `None` = whole address (floating IP).
    pub forward: Option<(u8, u16, u16)>,
    pub internal: u128,
}

/// A source translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snat {
    pub addr: u128,
    pub mask: u128,
    pub external: u128,
    /// Port range to allocate from; `None` = 1:1 (floating IP keeps ports).
    pub ports: Option<(u16, u16)>,
}

/// A compiled firewall rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwRule {
    pub proto: Option<u8>,
    pub src: (u128, u128),
    pub dst: (u128, u128),
    pub ports: (u16, u16),
    pub allow: bool,
    pub priority: u32,
    pub counter: usize,
}

/// A router's NAT and firewall.
#[derive(Debug, Clone)]
pub struct RouterStateful {
    pub zone: u32,
    pub external_switch: Option<SwitchId>,
    pub dnat: Vec<Dnat>,
    /// Longest logical prefix first.
    pub snat: Vec<Snat>,
    /// Highest priority first.
    pub firewall: Vec<FwRule>,
    /// L4 load balancers by VIP endpoint ([`crate::lb4::endpoint`]).
    pub lb: crate::fastmap::FastMap<u64, crate::lb4::Vip>,
}

impl RouterStateful {
    /// An empty stage for router `name` (its conntrack zone).
    pub fn new(name: &str) -> RouterStateful {
        RouterStateful {
            zone: zone_id("router", name),
            external_switch: None,
            dnat: Vec::new(),
            snat: Vec::new(),
            firewall: Vec::new(),
            lb: crate::fastmap::with_capacity(0),
        }
    }
}

fn v4_of(owner: &str, value: &str) -> Result<Ipv4Addr, NatError> {
    value.parse().map_err(|_| NatError::BadAddress {
        owner: owner.to_string(),
        value: value.to_string(),
    })
}

/// Compiles NAT and firewall rules per router (indexed like `desired.routers`);
/// adds ARP answers for external addresses to the external switches.
pub fn compile(
    desired: &DesiredState,
    switches: &mut [crate::tables::Switch],
    names: &mut Vec<RuleName>,
) -> Result<Vec<Option<RouterStateful>>, NatError> {
    let mut out: Vec<Option<RouterStateful>> = vec![None; desired.routers.len()];
    let router_id: HashMap<&str, usize> = desired
        .routers
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();
    let entry = |owner: &str, router: &str| -> Result<usize, NatError> {
        router_id
            .get(router)
            .copied()
            .ok_or_else(|| NatError::UnknownRouter {
                owner: owner.to_string(),
                router: router.to_string(),
            })
    };
    let new_router = |rid: usize| {
        RouterStateful::new(
            desired
                .routers
                .get(rid)
                .map(|r| r.name.as_str())
                .unwrap_or(""),
        )
    };
    for (i, n) in desired.nat.iter().enumerate() {
        let owner = format!("NAT rule {i} ({:?} on {:?})", n.kind, n.router);
        let rid = entry(&owner, &n.router)?;
        let ext = v4_of(&owner, &n.external_ip)?;
        // The external switch: the router's switch whose subnet holds the address.
        let Some((sw_id, sw)) = switches.iter_mut().enumerate().find(|(_, s)| {
            s.gateway
                .is_some_and(|g| g.router as usize == rid && s.subnet.contains(ext))
        }) else {
            return Err(NatError::ExternalIpOffRouter { owner, ip: ext });
        };
        let Some(gw) = sw.gateway else {
            return Err(NatError::ExternalIpOffRouter { owner, ip: ext });
        };
        if ext != gw.ip {
            match sw.arp.get(&u32::from(ext)) {
                Some(mac) if *mac != gw.mac => {
                    return Err(NatError::ExternalIpInUse { owner, ip: ext })
                }
                _ => {
                    sw.arp.insert(u32::from(ext), gw.mac);
                }
            }
        }
        let r = out
            .get_mut(rid)
            .ok_or_else(|| NatError::UnknownRouter {
                owner: owner.clone(),
                router: n.router.clone(),
            })?
            .get_or_insert_with(|| new_router(rid));
        r.external_switch = Some(u32::try_from(sw_id).unwrap_or(u32::MAX));
        let bad_logical = || NatError::BadAddress {
            owner: owner.clone(),
            value: n.logical_ip.clone(),
        };
        match n.kind {
            NatKind::Snat => {
                let (addr, mask, v6) =
                    parse_cidr(&owner, &n.logical_ip).map_err(|_| bad_logical())?;
                if v6 {
                    return Err(bad_logical());
                }
                let (lo, hi) = (n.port_min.unwrap_or(1024), n.port_max.unwrap_or(u16::MAX));
                if lo > hi || lo == 0 {
                    return Err(NatError::PortRangeOutOfOrder {
                        owner,
                        min: lo,
                        max: hi,
                    });
                }
                r.snat.push(Snat {
                    addr,
                    mask,
                    external: from_v4(ext),
                    ports: Some((lo, hi)),
                });
            }
            NatKind::Dnat | NatKind::DnatAndSnat => {
                let internal = from_v4(v4_of(&owner, &n.logical_ip).map_err(|_| bad_logical())?);
                let proto = parse_protocol(&owner, n.protocol.as_deref())?;
                let forward = match (proto, n.external_port, n.logical_port, n.kind) {
                    (None, None, None, _) => None,
                    (Some(p @ (IPPROTO_TCP | IPPROTO_UDP)), Some(e), Some(l), NatKind::Dnat) => {
                        Some((p, e, l))
                    }
                    _ => return Err(NatError::IncompletePortForward { owner }),
                };
                let d = Dnat {
                    external: from_v4(ext),
                    forward,
                    internal,
                };
                if r.dnat
                    .iter()
                    .any(|o| o.external == d.external && o.forward == d.forward)
                {
                    return Err(NatError::DuplicateDnat {
                        owner,
                        ip: n.external_ip.clone(),
                    });
                }
                r.dnat.push(d);
                if n.kind == NatKind::DnatAndSnat {
                    r.snat.push(Snat {
                        addr: internal,
                        mask: u128::MAX,
                        external: from_v4(ext),
                        ports: None,
                    });
                }
            }
        }
    }
    let mut fw_index: HashMap<usize, usize> = HashMap::new();
    for (i, f) in desired.firewall.iter().enumerate() {
        let owner = format!("Firewall rule {i} on {:?}", f.router);
        let rid = entry(&owner, &f.router)?;
        let proto = parse_protocol(&owner, f.protocol.as_deref())?;
        let cidr = |c: &Option<String>| -> Result<(u128, u128), NatError> {
            match c {
                None => Ok((0, 0)),
                Some(c) => {
                    let (a, m, v6) = parse_cidr(&owner, c)?;
                    if v6 {
                        return Err(NatError::BadAddress {
                            owner: owner.clone(),
                            value: c.clone(),
                        });
                    }
                    Ok((a, m))
                }
            }
        };
        let rule = FwRule {
            proto,
            src: cidr(&f.src_cidr)?,
            dst: cidr(&f.dst_cidr)?,
            ports: port_range(&owner, proto, f.port_min, f.port_max)?,
            allow: f.action == RuleAction::Allow,
            priority: f.priority,
            counter: names.len(),
        };
        let index = fw_index.entry(rid).or_insert(0);
        names.push(RuleName {
            kind: "firewall".into(),
            owner: f.router.clone(),
            index: *index,
        });
        *index += 1;
        out.get_mut(rid)
            .ok_or_else(|| NatError::UnknownRouter {
                owner: owner.clone(),
                router: f.router.clone(),
            })?
            .get_or_insert_with(|| new_router(rid))
            .firewall
            .push(rule);
    }
    for r in out.iter_mut().flatten() {
        r.snat.sort_by_key(|s| std::cmp::Reverse(s.mask));
        r.firewall
            .sort_by_key(|f| (std::cmp::Reverse(f.priority), f.allow));
    }
    Ok(out)
}

/// What [`pre_route`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreRoute {
    /// The router has no stateful configuration (or the packet is not trackable).
    Off,
    /// A tracked connection; `rewritten` = translated in place (re-parse).
    Tracked { rewritten: bool },
    /// A first packet: `orig` as it arrived, `cur` after DNAT (already
    /// written); `lb`: the load-balancer member's counter slot, if any.
    New {
        orig: Key,
        cur: Key,
        rewritten: bool,
        lb: u32,
    },
}

impl PreRoute {
    /// Whether the frame was rewritten and must be parsed again.
    pub fn rewritten(&self) -> bool {
        matches!(
            self,
            PreRoute::Tracked { rewritten: true }
                | PreRoute::New {
                    rewritten: true,
                    ..
                }
        )
    }
}

/// Router ingress: translate tracked connections, DNAT first packets.
// hot path: one hash lookup when the router has NAT or firewall rules.
pub fn pre_route<T: Tracer>(
    t: &Tables,
    st: &mut WorkerState,
    router: u32,
    p: &Parsed,
    buf: &mut [u8],
    len: usize,
    tr: &mut T,
) -> Result<PreRoute, DropReason> {
    let Some(Some(rs)) = t.stateful.routers.get(router as usize) else {
        return Ok(PreRoute::Off);
    };
    let Some(x) = buf.get(..len).and_then(|f| extract(p, f)) else {
        return Ok(PreRoute::Off);
    };
    if x.v6 {
        return Ok(PreRoute::Off);
    }
    let key = x.key.in_zone(rs.zone);
    let ct = &mut st.ct;
    if let Some(f) = ct.lookup(&key) {
        let Some(c) = ct.get(f.id).copied() else {
            return Err(DropReason::CtInvalid);
        };
        if ct.update(f.id, f.dir, key.proto, x.tcp.as_ref()).is_err() {
            tr.note("router_ct", || {
                "drop: invalid for the connection's TCP state".into()
            });
            return Err(DropReason::CtInvalid);
        }
        if c.lb != crate::lb4::NO_MEMBER {
            count_lb_packet(t, st, rs, f.id, &c);
        }
        let to = match f.dir {
            Dir::Original => c.reply.reversed(),
            Dir::Reply => c.orig.reversed(),
        };
        let rewritten = to != key;
        if rewritten && !rewrite(buf, p, &key, &to) {
            return Err(DropReason::MalformedL4);
        }
        tr.note("router_ct", || {
            format!(
                "{:?} packet of a tracked connection{}",
                f.dir,
                if rewritten {
                    format!(
                        ": translated to {}:{} → {}:{}",
                        show(to.src),
                        to.sport,
                        show(to.dst),
                        to.dport
                    )
                } else {
                    String::new()
                }
            )
        });
        return Ok(PreRoute::Tracked { rewritten });
    }
    if let Some(q) = x.related {
        // An ICMP error about a tracked packet: translate the quoted packet
        // back to what its sender saw, and the outer addresses with it.
        if let Some(f) = ct.lookup(&q.in_zone(rs.zone).reversed()) {
            let Some(c) = ct.get(f.id).copied() else {
                return Err(DropReason::CtInvalid);
            };
            let q = q.in_zone(rs.zone);
            let new_q = match f.dir {
                Dir::Reply => c.orig,
                Dir::Original => c.reply,
            };
            let rewritten = new_q != q;
            if rewritten && !rewrite_icmp_error(buf, p, len, &key, &q, &new_q) {
                return Err(DropReason::MalformedL4);
            }
            tr.note("router_ct", || {
                format!(
                    "ICMP error related to a tracked connection{}",
                    if rewritten {
                        format!(
                            ": quoted packet restored to {} → {}",
                            show(new_q.src),
                            show(new_q.dst)
                        )
                    } else {
                        String::new()
                    }
                )
            });
            return Ok(PreRoute::Tracked { rewritten });
        }
    }
    let mut cur = key;
    if !rs.lb.is_empty() {
        if let Some((vip, m)) = lb_member(t, rs, &key, &key, tr)? {
            cur.dst = m.addr;
            cur.dport = m.port;
            if !rewrite(buf, p, &key, &cur) {
                return Err(DropReason::MalformedL4);
            }
            tr.note("lb", || {
                format!(
                    "load balancer {:?}: new connection to {} → member {} (Maglev)",
                    vip.name,
                    crate::lb4::show(key.dst, key.dport),
                    crate::lb4::show(m.addr, m.port)
                )
            });
            return Ok(PreRoute::New {
                orig: key,
                cur,
                rewritten: true,
                lb: m.slot,
            });
        }
    }
    let dnat = rs.dnat.iter().find(|d| {
        d.external == key.dst
            && d.forward
                .is_none_or(|(proto, ext, _)| proto == key.proto && ext == key.dport)
    });
    let mut lb = crate::lb4::NO_MEMBER;
    if let Some(d) = dnat {
        cur.dst = d.internal;
        if let Some((_, _, port)) = d.forward {
            cur.dport = port;
        }
        tr.note("router_ct", || {
            format!(
                "DNAT {}:{} → {}:{}",
                show(key.dst),
                key.dport,
                show(cur.dst),
                cur.dport
            )
        });
        // A floating IP on a load balancer's VIP: the VIP's member, in the
        // same translation (one rewrite, one tracked connection).
        if let Some((vip, m)) = lb_member(t, rs, &key, &cur, tr)? {
            tr.note("lb", || {
                format!(
                    "load balancer {:?} behind the DNAT: {} → member {} (Maglev)",
                    vip.name,
                    crate::lb4::show(cur.dst, cur.dport),
                    crate::lb4::show(m.addr, m.port)
                )
            });
            cur.dst = m.addr;
            cur.dport = m.port;
            lb = m.slot;
        }
        if !rewrite(buf, p, &key, &cur) {
            return Err(DropReason::MalformedL4);
        }
    }
    Ok(PreRoute::New {
        orig: key,
        cur,
        rewritten: dnat.is_some(),
        lb,
    })
}

/// The member a new connection `key` gets when `at` (its destination,
/// after any DNAT) is a VIP: `None` when it is not one, an error when every
/// member is out (every compiled VIP has a member with weight, so `pick`
/// finds one unless monitors took them all out).
fn lb_member<'a, T: Tracer>(
    t: &Tables,
    rs: &'a RouterStateful,
    key: &Key,
    at: &Key,
    tr: &mut T,
) -> Result<Option<(&'a crate::lb4::Vip, &'a crate::lb4::Member)>, DropReason> {
    let Some(vip) = rs.lb.get(&crate::lb4::endpoint(at.proto, at.dst, at.dport)) else {
        return Ok(None);
    };
    match vip.pick(key, &t.stateful.lb.up) {
        Some(m) => Ok(Some((vip, m))),
        None => {
            tr.note("lb", || {
                format!("drop: load balancer {:?} has no member up", vip.name)
            });
            Err(DropReason::LbNoMemberUp)
        }
    }
}

/// Counts a packet of a load-balanced connection on its member. After an
/// apply the member's slot is looked up again in the new tables (once per
/// connection); a member no longer configured is not counted.
fn count_lb_packet(
    t: &Tables,
    st: &mut WorkerState,
    rs: &RouterStateful,
    id: u32,
    c: &crate::conntrack::Conn,
) {
    let slot = if c.generation == t.generation {
        c.lb
    } else {
        let slot = rs
            .lb
            .get(&crate::lb4::endpoint(
                c.orig.proto,
                c.orig.dst,
                c.orig.dport,
            ))
            .and_then(|v| v.member(c.reply.src, c.reply.sport))
            .map_or(crate::lb4::NO_MEMBER, |m| m.slot);
        if let Some(conn) = st.ct.get_mut(id) {
            conn.lb = slot;
            conn.generation = t.generation;
        }
        slot
    };
    if slot != crate::lb4::NO_MEMBER {
        st.lb.count(slot, false);
    }
}

/// Tries SNAT ports for a connection: the original if free, then hash-picked ones.
const SNAT_PROBES: u32 = 32;

/// A source port in `lo..=hi` for connection `cur` leaving as `out` (its
/// new source address set) whose reply is free and steers to this worker:
/// the original port if it fits, else hash-picked ones.
fn source_port<T: Tracer>(
    t: &Tables,
    st: &WorkerState,
    cur: Key,
    out: Key,
    (lo, hi): (u16, u16),
    tr: &mut T,
) -> Result<Key, DropReason> {
    let icmp = cur.proto == IPPROTO_ICMP;
    if !(cur.proto == IPPROTO_TCP || cur.proto == IPPROTO_UDP || icmp) {
        return Ok(out);
    }
    let span = u32::from(hi - lo) + 1;
    let mut h = foldhash::fast::FixedState::with_seed(0x736e_6174).build_hasher();
    h.write_u128(cur.src);
    h.write_u128(cur.dst);
    h.write_u16(cur.sport);
    h.write_u16(cur.dport);
    let base = u32::try_from(h.finish() >> 32).unwrap_or(0);
    let first = (lo..=hi).contains(&cur.sport).then_some(cur.sport);
    // With several workers only 1 in `count` ports steers back here: probe
    // as many more.
    let probes = SNAT_PROBES.saturating_mul(u32::try_from(st.shard.count).unwrap_or(1));
    let candidates = first.into_iter().chain((0..probes).map(|i| {
        let off = base.wrapping_add(i.wrapping_mul(7919)) % span;
        lo.wrapping_add(u16::try_from(off).unwrap_or(0))
    }));
    for port in candidates {
        let mut cand = out;
        cand.sport = port;
        if icmp {
            cand.dport = port;
        }
        let reply = cand.reversed();
        if st.shard.owns(t, &reply) && !st.ct.key_in_use(&reply) {
            return Ok(cand);
        }
    }
    tr.note("router_ct", || "drop: SNAT ports exhausted".into());
    Err(DropReason::NatPortsExhausted)
}

/// Router egress of a first packet: firewall, SNAT, start tracking.
/// Returns whether the frame was rewritten.
#[allow(clippy::too_many_arguments)]
pub fn post_route<T: Tracer>(
    t: &Tables,
    st: &mut WorkerState,
    router: u32,
    orig: Key,
    cur: Key,
    out_switch: SwitchId,
    lb: u32,
    p: &Parsed,
    buf: &mut [u8],
    tr: &mut T,
) -> Result<bool, DropReason> {
    let Some(Some(rs)) = t.stateful.routers.get(router as usize) else {
        return Ok(false);
    };
    if let Some(f) = rs.firewall.iter().find(|f| {
        f.proto.is_none_or(|p| p == cur.proto)
            && cur.src & f.src.1 == f.src.0
            && cur.dst & f.dst.1 == f.dst.0
            && (!(cur.proto == IPPROTO_TCP || cur.proto == IPPROTO_UDP)
                || (f.ports.0..=f.ports.1).contains(&cur.dport))
    }) {
        t.stateful.hit(Some(f.counter));
        if !f.allow {
            tr.note("router_firewall", || {
                format!(
                    "drop: {} → {} proto {} port {} denied by firewall rule",
                    show(cur.src),
                    show(cur.dst),
                    cur.proto,
                    cur.dport
                )
            });
            return Err(DropReason::FirewallDenied);
        }
        tr.note("router_firewall", || "allowed by firewall rule".into());
    }
    let mut out = cur;
    if Some(out_switch) == rs.external_switch {
        if let Some(s) = rs.snat.iter().find(|s| cur.src & s.mask == s.addr) {
            out.src = s.external;
            if let Some(ports) = s.ports {
                out = source_port(t, st, cur, out, ports, tr)?;
            }
        }
    }
    // Hairpin: a client on the subnet of the member it was sent to would be
    // answered by the member directly, past the router. Its source becomes
    // the VIP, so the member answers the VIP and the answer comes back here.
    if lb != crate::lb4::NO_MEMBER && out.src == cur.src {
        let on_member_subnet = t
            .switches
            .get(out_switch as usize)
            .zip(crate::conntrack::key::to_v4(cur.src))
            .is_some_and(|(sw, client)| sw.subnet.contains(client));
        if on_member_subnet {
            out.src = orig.dst;
            out = source_port(t, st, cur, out, (1024, 65535), tr)?;
            tr.note("lb", || {
                format!(
                    "hairpin: the client {} shares the member's subnet; source becomes the VIP {}",
                    show(cur.src),
                    crate::lb4::show(out.src, out.sport)
                )
            });
        }
    }
    let ct = &mut st.ct;
    if out == orig && rs.firewall.is_empty() {
        return Ok(false);
    }
    let id = match ct.create(orig, out.reversed(), t.generation) {
        Ok(id) => id,
        Err(CreateError::TableFull) => {
            tr.note("router_ct", || "drop: connection table full".into());
            return Err(DropReason::CtTableFull);
        }
        Err(CreateError::KeyInUse) => return Err(DropReason::NatPortsExhausted),
    };
    let tcp = buf.get(..).and_then(|f| extract(p, f)).and_then(|x| x.tcp);
    if ct
        .update(id, Dir::Original, orig.proto, tcp.as_ref())
        .is_err()
    {
        ct.remove(id);
        return Err(DropReason::CtInvalid);
    }
    let rewritten = out != cur;
    if rewritten && !rewrite(buf, p, &cur, &out) {
        ct.remove(id);
        return Err(DropReason::MalformedL4);
    }
    if lb != crate::lb4::NO_MEMBER {
        if let Some(c) = ct.get_mut(id) {
            c.lb = lb;
        }
        st.lb.count(lb, true);
    }
    tr.note("router_ct", || {
        format!(
            "new connection tracked in zone {:#x}{}",
            rs.zone,
            if rewritten {
                format!(": SNAT to {}:{}", show(out.src), out.sport)
            } else {
                String::new()
            }
        )
    });
    Ok(rewritten)
}

fn get16(buf: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(off)?, *buf.get(off + 1)?]))
}

fn put16(buf: &mut [u8], off: usize, v: u16) -> bool {
    match buf.get_mut(off..off + 2) {
        Some(d) => {
            d.copy_from_slice(&v.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Replaces the 16-bit word at `off` with `new`, fixing the checksums at
/// `sums` (offsets of checksum fields covering the word).
fn set_word(buf: &mut [u8], off: usize, new: u16, sums: &[Option<usize>]) -> bool {
    let Some(old) = get16(buf, off) else {
        return false;
    };
    if old == new {
        return true;
    }
    for s in sums.iter().flatten() {
        let Some(c) = get16(buf, *s) else {
            return false;
        };
        if !put16(buf, *s, update16(c, old, new)) {
            return false;
        }
    }
    put16(buf, off, new)
}

/// Rewrites an IPv4 packet's tuple from `from` to `to` in place.
// hot path: incremental checksum updates only (RFC 1624).
fn rewrite(buf: &mut [u8], p: &Parsed, from: &Key, to: &Key) -> bool {
    let l3 = p.l3_offset;
    let l4 = p.l4_offset;
    let ip_sum = Some(l3 + 10);
    let has_l4 = l4 != 0;
    let l4_sum = match from.proto {
        IPPROTO_TCP if has_l4 => Some(l4 + 16),
        IPPROTO_UDP if has_l4 && get16(buf, l4 + 6).is_some_and(|c| c != 0) => Some(l4 + 6),
        _ => None,
    };
    for (off, old, new) in [(l3 + 12, from.src, to.src), (l3 + 16, from.dst, to.dst)] {
        if old == new {
            continue;
        }
        let new = u32::try_from(new & 0xffff_ffff).unwrap_or(0).to_be_bytes();
        let hi = u16::from_be_bytes([new[0], new[1]]);
        let lo = u16::from_be_bytes([new[2], new[3]]);
        if !(set_word(buf, off, hi, &[ip_sum, l4_sum])
            && set_word(buf, off + 2, lo, &[ip_sum, l4_sum]))
        {
            return false;
        }
    }
    if !has_l4 {
        return true;
    }
    match from.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            set_word(buf, l4, to.sport, &[l4_sum]) && set_word(buf, l4 + 2, to.dport, &[l4_sum])
        }
        // Echo request/reply: the identifier is both "ports".
        IPPROTO_ICMP if from.sport == from.dport && to.sport == to.dport => {
            let is_echo = matches!(buf.get(l4), Some(0 | 8));
            !is_echo || set_word(buf, l4 + 4, to.sport, &[Some(l4 + 2)])
        }
        _ => true,
    }
}

/// Rewrites an IPv4 ICMP error whose quoted packet was `old_q` to quote
/// `new_q`: the outer destination becomes the quoted source (the packet's
/// real sender); the outer source follows the quoted destination when it was
/// that host. Inner IP and UDP checksums are updated incrementally, the ICMP
/// checksum is recomputed (errors are rare and short).
fn rewrite_icmp_error(
    buf: &mut [u8],
    p: &Parsed,
    len: usize,
    outer: &Key,
    old_q: &Key,
    new_q: &Key,
) -> bool {
    let (l3, l4) = (p.l3_offset, p.l4_offset);
    let inner = l4 + 8;
    let Some(ihl) = buf.get(inner).map(|b| usize::from(b & 0x0f) * 4) else {
        return false;
    };
    let inner_sum = Some(inner + 10);
    let inner_l4 = inner + ihl;
    let udp_sum = (old_q.proto == IPPROTO_UDP && get16(buf, inner_l4 + 6).is_some_and(|c| c != 0))
        .then_some(inner_l4 + 6);
    let words = |a: u128| {
        let b = u32::try_from(a & 0xffff_ffff).unwrap_or(0).to_be_bytes();
        [
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        ]
    };
    let mut ok = true;
    for (off, new) in [(inner + 12, new_q.src), (inner + 16, new_q.dst)] {
        let [hi, lo] = words(new);
        ok &= set_word(buf, off, hi, &[inner_sum, udp_sum])
            && set_word(buf, off + 2, lo, &[inner_sum, udp_sum]);
    }
    if matches!(old_q.proto, IPPROTO_TCP | IPPROTO_UDP) {
        ok &= set_word(buf, inner_l4, new_q.sport, &[udp_sum])
            && set_word(buf, inner_l4 + 2, new_q.dport, &[udp_sum]);
    } else if old_q.proto == IPPROTO_ICMP && old_q.sport == old_q.dport {
        ok &= !matches!(buf.get(inner_l4), Some(0 | 8))
            || set_word(buf, inner_l4 + 4, new_q.sport, &[]);
    }
    let outer_src = if outer.src == old_q.dst {
        new_q.dst
    } else {
        outer.src
    };
    for (off, new) in [(l3 + 12, outer_src), (l3 + 16, new_q.src)] {
        let [hi, lo] = words(new);
        ok &= set_word(buf, off, hi, &[Some(l3 + 10)])
            && set_word(buf, off + 2, lo, &[Some(l3 + 10)]);
    }
    // The quoted echo identifier sits outside the inner checksums; the ICMP
    // checksum covers everything: recompute it.
    let end = match p.l3 {
        crate::packet::parse::L3::Ipv4(ip) => l3 + ip.total_len,
        _ => len,
    };
    ok &= put16(buf, l4 + 2, 0);
    let sum = match buf.get(l4..end.min(len)) {
        Some(icmp) => crate::packet::checksum::internet_checksum(icmp),
        None => return false,
    };
    ok && put16(buf, l4 + 2, sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::ipv4;
    use crate::packet::checksum::{accumulate, finish, internet_checksum};
    use crate::packet::parse;

    fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut tcp = [0u8; 24];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = 0x02;
        tcp[20..24].copy_from_slice(b"data");
        let mut sum = accumulate(0, &src);
        sum = accumulate(sum, &dst);
        sum = accumulate(sum, &[0, 6, 0, 24]);
        sum = accumulate(sum, &tcp);
        let c = finish(sum);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        ipv4([2; 6], [4; 6], None, src.into(), dst.into(), 64, 6, &tcp)
    }

    #[test]
    fn rewrite_matches_a_freshly_built_packet() {
        let f = tcp_frame([10, 0, 1, 10], [198, 18, 0, 100], 40000, 80);
        let p = parse(&f).unwrap();
        let from = extract(&p, &f).unwrap().key;
        let mut to = from;
        to.src = from_v4(Ipv4Addr::new(198, 18, 0, 1));
        to.sport = 20001;
        let mut g = f.clone();
        assert!(rewrite(&mut g, &p, &from, &to));
        let want = tcp_frame([198, 18, 0, 1], [198, 18, 0, 100], 20001, 80);
        assert_eq!(g, want);
        assert_eq!(internet_checksum(&g[14..34]), 0);
    }
}
