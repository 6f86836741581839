//! L4 load balancing in the router: a VIP:port (TCP or UDP) on a logical
//! router spread over member addresses by Maglev consistent hashing.
//!
//! # Design
//!
//! - **Where.** A load balancer belongs to a router, like a NAT rule: it
//!   applies to traffic the router routes. The VIP must be inside one of the
//!   router's subnets; unless it is the gateway's own address, the ARP
//!   responder answers it with the gateway MAC, so clients send to the router.
//! - **Selection.** The first packet of a connection to VIP:port (no entry in
//!   the router's conntrack zone) hashes its client address, client port and
//!   protocol and looks the hash up in the VIP's Maglev table
//!   ([`crate::maglev`], built here at configuration compile time, never per
//!   packet). Members are named by `ip:port` in the table, so removing one
//!   member only remaps the table entries it owned; weights set each
//!   member's share.
//! - **Translation and affinity.** The chosen member becomes a DNAT of the
//!   first packet in [`crate::nat::pre_route`]; [`crate::nat::post_route`]
//!   tracks the connection in the router's zone with the member in its reply
//!   tuple. Every later packet (both directions) is translated from that
//!   entry, not from the table: a flow keeps its member whatever the member
//!   set becomes (a removed member's established flows run until they end).
//!   Replies are un-DNATed back to the VIP by the same generic rewrite as NAT
//!   replies; checksums (IPv4 header and the L4 pseudo-header) are updated
//!   incrementally.
//! - **Client address preserved (DNAT only).** Members see the real client
//!   address; their replies must come back through the router, which holds
//!   for members on the router's subnets using its gateway (the usual VM
//!   setup). A client on the same subnet as the member it is sent to would
//!   be answered directly at L2: that connection is hairpinned (its source
//!   becomes the VIP, [`crate::nat::post_route`]), so that member sees the
//!   VIP instead of the client. DSR is not used because members would need
//!   the VIP on a loopback.
//! - **Counters.** Per member: new flows and packets (both directions),
//!   counted in per-worker arrays and folded into the tables' atomics once
//!   per round (`{"op":"lb_stats"}`). A connection remembers its member's
//!   counter slot; after an apply its next packet finds the slot again in
//!   the new tables (by VIP and member address).
//! - **Steering** (several workers): a VIP or member endpoint
//!   (address, port, protocol) is left out of the steering hash, so a
//!   client's packets to the VIP and the member's replies to that client
//!   meet on one worker ([`crate::steer`]). A member with weight 0 stays an
//!   endpoint (drained: no new connections, its open ones keep steering
//!   right); one removed outright is no endpoint any more, so with several
//!   workers its open connections are cut. Drain first, then remove.
//!
//! # Assumptions / not yet
//!
//! - **Health.** A load balancer with a monitor has its TCP members probed
//!   by the data plane ([`crate::lb4_health`]); a member out is skipped by
//!   [`Vip::pick`] (the next table entries are tried), so only its own
//!   connections move and open ones are kept.
//!
//! # Assumptions / not yet
//!
//! IPv4 only; no connection limits.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::conntrack::key::{from_v4, to_v4, Key};
use crate::fastmap::FastMap;
use crate::maglev::{self, Maglev};
use crate::nat::RouterStateful;
use crate::packet::headers::{IPPROTO_TCP, IPPROTO_UDP};
use crate::tables::Switch;

/// Transport of a load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbProtocol {
    Tcp,
    Udp,
}

impl LbProtocol {
    fn number(self) -> u8 {
        match self {
            LbProtocol::Tcp => IPPROTO_TCP,
            LbProtocol::Udp => IPPROTO_UDP,
        }
    }
}

/// An L4 load balancer: `vip:port` over `members`, on a router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerSpec {
    pub name: String,
    /// The logical router whose routed traffic it applies to.
    pub router: String,
    /// IPv4 address inside one of the router's subnets.
    pub vip: String,
    pub protocol: LbProtocol,
    /// 1..=65535.
    pub port: u16,
    /// What a new connection's member is chosen by.
    #[serde(default)]
    pub hash: LbHash,
    /// TCP connect probes from the router; members that fail them get no
    /// new connections ([`crate::lb4_health`]).
    #[serde(default)]
    pub monitor: Option<LbMonitorSpec>,
    pub members: Vec<LbMemberSpec>,
}

/// A health monitor: a probe from the router's address on the member's
/// subnet every `interval_ms`; its answer within `timeout_ms` is a success,
/// anything else (RST, silence) a failure. `fall` failures in a row take a
/// member out, `rise` successes bring it back (HAProxy's semantics; members
/// start in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbMonitorSpec {
    #[serde(default)]
    pub kind: ProbeKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u8,
    pub fall: u8,
}

/// What a probe is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// A SYN to the member's port, answered by a SYN-ACK (TCP members).
    #[default]
    Tcp,
    /// An ICMP echo request to the member, answered by a reply (any member).
    Ping,
    /// An empty datagram to the member's port (Octavia's UDP-CONNECT): an
    /// ICMP port unreachable is a failure, an answer or silence a success.
    UdpConnect,
}

/// The key of the Maglev lookup for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbHash {
    /// Client address, port and protocol: each connection on its own.
    #[default]
    SourceIpPort,
    /// Client address only: all of a client's connections on one member
    /// (source-IP persistence).
    SourceIp,
}

/// A member of a load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbMemberSpec {
    /// IPv4 address inside one of the router's subnets.
    pub ip: String,
    /// 1..=65535.
    pub port: u16,
    /// Relative share of new connections; 0 takes none (drained).
    #[serde(default = "default_weight")]
    pub weight: u16,
}

fn default_weight() -> u16 {
    1
}

/// Members over all load balancers (per-worker counter arrays are this long).
pub const MAX_MEMBERS: usize = 16_384;

/// Why load balancers were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lb4Error {
    #[error("Load balancer {lb:?}: unknown router {router:?}")]
    UnknownRouter { lb: String, router: String },
    #[error(
        "Load balancer {lb:?}: bad IPv4 address {value:?} (IPv6 load balancers are not supported)"
    )]
    BadAddress { lb: String, value: String },
    #[error("Load balancer {lb:?}: {what} port 0 is out of range 1..=65535")]
    PortOutOfRange { lb: String, what: &'static str },
    #[error("Load balancer {lb:?}: VIP {vip} is on none of router {router:?}'s subnets")]
    VipOffRouter {
        lb: String,
        vip: Ipv4Addr,
        router: String,
    },
    #[error("Load balancer {lb:?}: VIP {vip} is bound to a port")]
    VipInUse { lb: String, vip: Ipv4Addr },
    #[error("Load balancer {lb:?}: {vip}:{port}/{protocol} is already forwarded by {other}")]
    DuplicateVip {
        lb: String,
        vip: Ipv4Addr,
        port: u16,
        protocol: &'static str,
        other: String,
    },
    #[error("Load balancer {lb:?}: monitor {why}")]
    BadMonitor { lb: String, why: &'static str },
    #[error("Load balancer {lb:?}: no member with a weight above 0")]
    NoMembers { lb: String },
    #[error("Load balancer {lb:?}: member {ip}:{port} is listed twice")]
    DuplicateMember { lb: String, ip: Ipv4Addr, port: u16 },
    #[error("Load balancer {lb:?}: member {ip} is on none of router {router:?}'s subnets")]
    MemberOffRouter {
        lb: String,
        ip: Ipv4Addr,
        router: String,
    },
    #[error("Duplicate load balancer name {name:?}")]
    DuplicateName { name: String },
    #[error("Too many load balancer members: {count} (limit {MAX_MEMBERS})")]
    TooManyMembers { count: usize },
}

/// Sentinel: a connection without a load-balancer member.
pub const NO_MEMBER: u32 = u32::MAX;

/// A compiled member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub addr: u128,
    pub port: u16,
    /// Counter slot in [`Lb4Tables`].
    pub slot: u32,
}

/// A compiled VIP:port of one load balancer.
#[derive(Debug, Clone)]
pub struct Vip {
    pub name: Arc<str>,
    pub members: Vec<Member>,
    /// Hash → index in `members`.
    pub maglev: Maglev,
    pub hash: LbHash,
}

impl Vip {
    /// The member for a new connection `k` (client → VIP).
    // hot path (new connections): a mix and one table read.
    #[inline]
    /// A member its monitor took out is skipped: the next table entries
    /// are tried, so only its own connections move (spread like its
    /// entries' neighbours), and `None` when every member is out.
    pub fn pick(&self, k: &Key, up: &[AtomicBool]) -> Option<&Member> {
        let hash = match self.hash {
            LbHash::SourceIpPort => flow_hash(k),
            LbHash::SourceIp => client_hash(k),
        };
        (0..PICK_TRIES).find_map(|i| {
            let m = self
                .members
                .get(self.maglev.lookup(hash.wrapping_add(i))?)?;
            up.get(m.slot as usize)
                .is_none_or(|u| u.load(Ordering::Relaxed))
                .then_some(m)
        })
    }

    /// The member at `addr:port` (after an apply: a connection's member).
    pub fn member(&self, addr: u128, port: u16) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.addr == addr && m.port == port)
    }
}

/// Table entries tried past a member that is out (the chance that a
/// healthy member owns none of them is negligible unless nearly all are out).
const PICK_TRIES: u64 = 64;

/// The Maglev hash of a connection: client address, client port, protocol
/// (the VIP is fixed per table). Stable across processes and releases.
#[inline]
pub fn flow_hash(k: &Key) -> u64 {
    let client = u64::try_from(k.src & 0xffff_ffff).unwrap_or(0);
    maglev::mix((client << 24) | (u64::from(k.sport) << 8) | u64::from(k.proto))
}

/// The Maglev hash of a connection's client address alone.
#[inline]
pub fn client_hash(k: &Key) -> u64 {
    maglev::mix(u64::try_from(k.src & 0xffff_ffff).unwrap_or(0) << 24)
}

/// Key of an IPv4 `(protocol, address, port)` endpoint in the lookup maps.
#[inline]
pub fn endpoint(proto: u8, addr: u128, port: u16) -> u64 {
    (u64::try_from(addr & 0xffff_ffff).unwrap_or(0) << 24)
        | (u64::from(port) << 8)
        | u64::from(proto)
}

/// The smallest table size of a few primes with ≥ 128 entries per member
/// (Maglev needs M ≫ N for even shares and small disruption).
pub fn table_size(members: usize) -> usize {
    const PRIMES: [usize; 4] = [1_021, 4_093, 16_381, maglev::DEFAULT_TABLE_SIZE];
    let want = members.saturating_mul(128);
    PRIMES
        .iter()
        .copied()
        .find(|&p| p >= want)
        .unwrap_or(maglev::DEFAULT_TABLE_SIZE)
}

/// Names of the member counter slots and the shared counters.
#[derive(Debug, Clone, Default)]
pub struct Lb4Tables {
    /// Per slot: (load balancer, member ip, member port).
    pub names: Arc<[(Arc<str>, Ipv4Addr, u16)]>,
    pub flows: Arc<[AtomicU64]>,
    pub packets: Arc<[AtomicU64]>,
    /// Per slot: whether the member takes new connections (its monitor's
    /// verdict, kept across applies by [`crate::lb4_health`]).
    pub up: Arc<[AtomicBool]>,
    /// Per slot: probes sent, answered (SYN-ACK, echo reply, datagram) and
    /// refused (RST, ICMP port unreachable).
    pub probes_sent: Arc<[AtomicU64]>,
    pub probes_answered: Arc<[AtomicU64]>,
    pub probes_refused: Arc<[AtomicU64]>,
    /// The monitored load balancers.
    pub monitors: Arc<[Monitor]>,
    /// Every VIP and member endpoint ([`endpoint`]), for steering.
    pub endpoints: FastMap<u64, ()>,
}

/// A monitored load balancer: what its probes go to.
#[derive(Debug)]
pub struct Monitor {
    pub name: Arc<str>,
    pub spec: LbMonitorSpec,
    /// Bumped by the monitor thread: every worker sends the probes of a
    /// new round it owns ([`crate::lb4_health`]).
    pub round: AtomicU64,
    pub targets: Vec<ProbeTarget>,
}

/// A member to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTarget {
    pub slot: u32,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The member's switch (the router's leg the probe leaves from).
    pub switch: u32,
}

/// A member's health as the data plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberHealth {
    /// No monitor: always takes connections.
    Unmonitored,
    Up,
    Down,
}

/// One member's counters, as reported by `{"op":"lb_stats"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbMemberStats {
    pub load_balancer: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Connections sent to this member.
    pub flows: u64,
    /// Packets of those connections, both directions.
    pub packets: u64,
    pub health: MemberHealth,
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probes_refused: u64,
}

impl Lb4Tables {
    /// Counters per member, in configuration order.
    pub fn stats(&self) -> Vec<LbMemberStats> {
        let load = |v: &[AtomicU64], i: usize| v.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
        let mut monitored = vec![false; self.names.len()];
        for t in self.monitors.iter().flat_map(|m| &m.targets) {
            if let Some(m) = monitored.get_mut(t.slot as usize) {
                *m = true;
            }
        }
        self.names
            .iter()
            .enumerate()
            .map(|(i, (lb, ip, port))| LbMemberStats {
                load_balancer: lb.to_string(),
                ip: *ip,
                port: *port,
                flows: load(&self.flows, i),
                packets: load(&self.packets, i),
                health: match (
                    monitored.get(i).copied().unwrap_or(false),
                    self.up.get(i).map(|u| u.load(Ordering::Relaxed)),
                ) {
                    (false, _) => MemberHealth::Unmonitored,
                    (true, Some(false)) => MemberHealth::Down,
                    (true, _) => MemberHealth::Up,
                },
                probes_sent: load(&self.probes_sent, i),
                probes_answered: load(&self.probes_answered, i),
                probes_refused: load(&self.probes_refused, i),
            })
            .collect()
    }

    /// Whether `(proto, addr, port)` is a VIP or member endpoint.
    // hot path (several workers): one hash probe when load balancers exist.
    #[inline]
    pub fn is_endpoint(&self, proto: u8, addr: u128, port: u16) -> bool {
        !self.endpoints.is_empty() && self.endpoints.contains_key(&endpoint(proto, addr, port))
    }
}

/// A worker's member counts, folded once per round.
pub struct LbCounters {
    flows: Vec<u64>,
    packets: Vec<u64>,
    dirty: Vec<u32>,
}

impl Default for LbCounters {
    fn default() -> Self {
        LbCounters {
            flows: vec![0; MAX_MEMBERS],
            packets: vec![0; MAX_MEMBERS],
            dirty: Vec::with_capacity(MAX_MEMBERS),
        }
    }
}

impl LbCounters {
    /// Counts a packet of member `slot`'s connection (and a new flow).
    // hot path: two indexed adds.
    #[inline]
    pub fn count(&mut self, slot: u32, new_flow: bool) {
        let i = slot as usize;
        let (Some(p), Some(f)) = (self.packets.get_mut(i), self.flows.get_mut(i)) else {
            return;
        };
        if *p == 0 {
            self.dirty.push(slot);
        }
        *p += 1;
        *f += u64::from(new_flow);
    }

    /// Adds and zeroes the counts into the tables' counters. Counts of a
    /// round are always of the tables loaded for that round.
    pub fn fold(&mut self, t: &Lb4Tables) {
        for slot in self.dirty.drain(..) {
            let i = slot as usize;
            let (Some(p), Some(f)) = (self.packets.get_mut(i), self.flows.get_mut(i)) else {
                continue;
            };
            if let (Some(sp), Some(sf)) = (t.packets.get(i), t.flows.get(i)) {
                sp.fetch_add(*p, Ordering::Relaxed);
                sf.fetch_add(*f, Ordering::Relaxed);
            }
            *p = 0;
            *f = 0;
        }
    }
}

fn v4_of(lb: &str, value: &str) -> Result<Ipv4Addr, Lb4Error> {
    value.parse().map_err(|_| Lb4Error::BadAddress {
        lb: lb.to_string(),
        value: value.to_string(),
    })
}

fn proto_name(p: u8) -> &'static str {
    if p == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// Compiles `specs` into the routers' stateful stages (indexed like
/// `router_names`; a router gets a stage if it has none), adds ARP answers
/// for VIPs and returns the counters.
pub fn compile(
    specs: &[LoadBalancerSpec],
    router_names: &[&str],
    switches: &mut [Switch],
    routers: &mut [Option<RouterStateful>],
) -> Result<Lb4Tables, Lb4Error> {
    let count: usize = specs.iter().map(|s| s.members.len()).sum();
    if count > MAX_MEMBERS {
        return Err(Lb4Error::TooManyMembers { count });
    }
    let mut seen_names: HashMap<&str, ()> = HashMap::new();
    let mut monitors = Vec::new();
    let mut names = Vec::with_capacity(count);
    let mut endpoints = crate::fastmap::with_capacity(count + specs.len());
    // (router, VIP endpoint) → load balancer name, for duplicates.
    let mut vips: HashMap<(usize, u64), &str> = HashMap::new();
    for s in specs {
        let lb = s.name.as_str();
        if seen_names.insert(lb, ()).is_some() {
            return Err(Lb4Error::DuplicateName {
                name: lb.to_string(),
            });
        }
        let rid = router_names
            .iter()
            .position(|r| *r == s.router)
            .ok_or_else(|| Lb4Error::UnknownRouter {
                lb: lb.to_string(),
                router: s.router.clone(),
            })?;
        let vip = v4_of(lb, &s.vip)?;
        let proto = s.protocol.number();
        if s.port == 0 {
            return Err(Lb4Error::PortOutOfRange {
                lb: lb.into(),
                what: "VIP",
            });
        }
        let on_router = |sw: &Switch, ip: Ipv4Addr| {
            sw.gateway
                .is_some_and(|g| g.router as usize == rid && sw.subnet.contains(ip))
        };
        let Some(sw) = switches.iter_mut().find(|sw| on_router(sw, vip)) else {
            return Err(Lb4Error::VipOffRouter {
                lb: lb.into(),
                vip,
                router: s.router.clone(),
            });
        };
        let Some(gw) = sw.gateway else {
            return Err(Lb4Error::VipOffRouter {
                lb: lb.into(),
                vip,
                router: s.router.clone(),
            });
        };
        if vip != gw.ip {
            match sw.arp.get(&u32::from(vip)) {
                Some(mac) if *mac != gw.mac => {
                    return Err(Lb4Error::VipInUse { lb: lb.into(), vip })
                }
                _ => {
                    sw.arp.insert(u32::from(vip), gw.mac);
                }
            }
        }
        let key = endpoint(proto, from_v4(vip), s.port);
        let dup = |other: String| Lb4Error::DuplicateVip {
            lb: lb.into(),
            vip,
            port: s.port,
            protocol: proto_name(proto),
            other,
        };
        if let Some(other) = vips.insert((rid, key), lb) {
            return Err(dup(format!("load balancer {other:?}")));
        }
        let stage = routers
            .get_mut(rid)
            .ok_or_else(|| Lb4Error::UnknownRouter {
                lb: lb.to_string(),
                router: s.router.clone(),
            })?
            .get_or_insert_with(|| RouterStateful::new(&s.router));
        if stage.dnat.iter().any(|d| {
            d.external == from_v4(vip)
                && d.forward
                    .is_none_or(|(p, ext, _)| p == proto && ext == s.port)
        }) {
            return Err(dup("a NAT rule".into()));
        }
        let name: Arc<str> = Arc::from(lb);
        if let Some(m) = &s.monitor {
            check_monitor(lb, s.protocol, m)?;
        }
        let mut targets = Vec::new();
        let mut members = Vec::with_capacity(s.members.len());
        let mut table_names = Vec::with_capacity(s.members.len());
        for m in &s.members {
            let ip = v4_of(lb, &m.ip)?;
            if m.port == 0 {
                return Err(Lb4Error::PortOutOfRange {
                    lb: lb.into(),
                    what: "member",
                });
            }
            let Some(member_switch) = switches.iter().position(|sw| on_router(sw, ip)) else {
                return Err(Lb4Error::MemberOffRouter {
                    lb: lb.into(),
                    ip,
                    router: s.router.clone(),
                });
            };
            if members
                .iter()
                .any(|o: &Member| o.addr == from_v4(ip) && o.port == m.port)
            {
                return Err(Lb4Error::DuplicateMember {
                    lb: lb.into(),
                    ip,
                    port: m.port,
                });
            }
            let slot = u32::try_from(names.len()).unwrap_or(NO_MEMBER);
            if s.monitor.is_some() {
                targets.push(ProbeTarget {
                    slot,
                    ip,
                    port: m.port,
                    switch: u32::try_from(member_switch).unwrap_or(u32::MAX),
                });
            }
            names.push((name.clone(), ip, m.port));
            endpoints.insert(endpoint(proto, from_v4(ip), m.port), ());
            members.push(Member {
                addr: from_v4(ip),
                port: m.port,
                slot,
            });
            // Named by address, not position: a member keeps its table
            // entries when others come and go.
            table_names.push((format!("{ip}:{}", m.port), m.weight));
        }
        if !table_names.iter().any(|(_, w)| *w > 0) {
            return Err(Lb4Error::NoMembers { lb: lb.into() });
        }
        endpoints.insert(key, ());
        if let Some(spec) = s.monitor {
            monitors.push(Monitor {
                name: name.clone(),
                spec,
                round: AtomicU64::new(0),
                targets,
            });
        }
        let maglev = Maglev::new(&table_names, table_size(table_names.len()));
        stage.lb.insert(
            key,
            Vip {
                name,
                members,
                maglev,
                hash: s.hash,
            },
        );
    }
    let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Arc<[_]>>();
    Ok(Lb4Tables {
        flows: zeros(names.len()),
        packets: zeros(names.len()),
        up: (0..names.len()).map(|_| AtomicBool::new(true)).collect(),
        probes_sent: zeros(names.len()),
        probes_answered: zeros(names.len()),
        probes_refused: zeros(names.len()),
        monitors: monitors.into(),
        names: names.into(),
        endpoints,
    })
}

fn check_monitor(lb: &str, protocol: LbProtocol, m: &LbMonitorSpec) -> Result<(), Lb4Error> {
    let bad = |why| {
        Err(Lb4Error::BadMonitor {
            lb: lb.to_owned(),
            why,
        })
    };
    if m.kind == ProbeKind::Tcp && protocol != LbProtocol::Tcp {
        return bad("kind tcp probes TCP members only (UDP has no handshake to answer: use ping)");
    }
    if m.kind == ProbeKind::UdpConnect && protocol != LbProtocol::Udp {
        return bad("kind udp_connect probes UDP members only");
    }
    if !(100..=3_600_000).contains(&m.interval_ms) {
        return bad("interval_ms must be 100..=3600000");
    }
    if m.timeout_ms == 0 || m.timeout_ms > m.interval_ms {
        return bad("timeout_ms must be 1..=interval_ms");
    }
    if !(1..=10).contains(&m.rise) || !(1..=10).contains(&m.fall) {
        return bad("rise and fall must be 1..=10");
    }
    Ok(())
}

/// The address and port of a member or VIP as text (traces).
pub fn show(addr: u128, port: u16) -> String {
    match to_v4(addr) {
        Some(a) => format!("{a}:{port}"),
        None => format!("[{}]:{port}", std::net::Ipv6Addr::from(addr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<(String, u16)> {
        (0..n)
            .map(|i| (format!("10.0.2.{}:80", 10 + i), 1))
            .collect()
    }

    #[test]
    fn table_sizes_are_prime_and_large_enough() {
        for n in [1, 3, 8, 31, 32, 127, 128, 600] {
            let m = table_size(n);
            assert!(m >= (n * 128).min(maglev::DEFAULT_TABLE_SIZE), "{n} → {m}");
            assert!(
                (2..m)
                    .take_while(|d| d * d <= m)
                    .all(|d| !m.is_multiple_of(d)),
                "{m}"
            );
        }
    }

    /// Removing one of N members moves that member's entries and (almost)
    /// nothing else: the bound the data plane relies on for existing
    /// clients of the other members when a member is taken out.
    #[test]
    fn removing_a_member_only_remaps_its_share() {
        for n in [3usize, 5, 10] {
            let before_set = members(n);
            let size = table_size(n);
            let before = Maglev::new(&before_set, size);
            let gone = before_set[1].0.clone();
            let after_set: Vec<_> = before_set.iter().filter(|m| m.0 != gone).cloned().collect();
            let after = Maglev::new(&after_set, size);
            let mut collateral = 0usize;
            let mut owned = 0usize;
            for (b, a) in before.entries().iter().zip(after.entries()) {
                let was = &before_set[*b as usize].0;
                if *was == gone {
                    owned += 1;
                } else if *was != after_set[*a as usize].0 {
                    collateral += 1;
                }
            }
            let share = owned as f64 / size as f64;
            assert!((share - 1.0 / n as f64).abs() < 0.02, "n={n} share {share}");
            // Maglev's paper: a few percent collateral at M ≥ 100·N.
            let c = collateral as f64 / size as f64;
            assert!(c < 0.03, "n={n}: {c} of the table moved between survivors");
        }
    }

    #[test]
    fn weights_set_the_share_in_small_tables() {
        let set = vec![
            ("10.0.2.10:80".to_string(), 1u16),
            ("10.0.2.11:80".to_string(), 2u16),
        ];
        let m = Maglev::new(&set, table_size(2));
        let heavy = m.entries().iter().filter(|e| **e == 1).count();
        let ratio = heavy as f64 / (m.entries().len() - heavy) as f64;
        assert!((1.9..2.1).contains(&ratio), "{ratio}");
    }

    #[test]
    fn flow_hash_spreads_client_ports() {
        let set = members(3);
        let m = Maglev::new(&set, table_size(3));
        let mut hits = [0usize; 3];
        for sport in 30000..33000u16 {
            let k = Key {
                src: from_v4(Ipv4Addr::new(10, 0, 1, 10)),
                dst: from_v4(Ipv4Addr::new(10, 0, 1, 100)),
                zone: 0,
                sport,
                dport: 80,
                proto: IPPROTO_TCP,
            };
            hits[m.lookup(flow_hash(&k)).unwrap()] += 1;
        }
        for h in hits {
            assert!((800..1200).contains(&h), "{hits:?}");
        }
    }
}
