//! Security groups: compilation of [`crate::model::SecurityGroupSpec`]s into per-port
//! rule lists, and their evaluation.
//!
//! Rules are evaluated only for the first packet of a connection (and once
//! more per connection after a configuration change); everything else is
//! decided by connection tracking in the port's zone ([`crate::stateful`]).
//! A port's rules are the union of its groups' rules for each direction,
//! sorted by priority (higher first, deny before allow on a tie), so the
//! first match decides. Remote groups are compiled to the sorted addresses
//! of the group's ports, so membership changes apply with the next apply.
//!
//! Address groups and port sets are set matches, not rule expansions: a
//! rule naming an address group holds the group's CIDRs of its family as one
//! sorted list of disjoint address intervals, a rule naming a port set its
//! ports as one sorted list of disjoint port intervals ([`Ranges`]); a
//! packet is looked up in each with one binary search (no allocation). A
//! change of a group or set recompiles the rules naming it at the next
//! apply, and established connections are re-judged like after any rule
//! change.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::conntrack::key::from_v4;
use crate::model::{DesiredState, EtherType, RuleAction, RuleDirection, SecurityRuleSpec};
use crate::packet::headers::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::tables::Lport;

/// Why security groups (or firewall rules) were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityError {
    #[error("Security group {group:?}: unknown port {port:?}")]
    UnknownPort { group: String, port: String },
    #[error("{owner}: unknown remote group {remote:?}")]
    UnknownRemoteGroup { owner: String, remote: String },
    #[error("{owner}: bad protocol {value:?} (want tcp, udp, icmp, icmpv6, any or 0..=255)")]
    BadProtocol { owner: String, value: String },
    #[error("{owner}: port range {min}..={max} is empty")]
    PortRangeOutOfOrder { owner: String, min: u16, max: u16 },
    #[error("{owner}: ports need protocol tcp or udp")]
    PortsWithoutTcpUdp { owner: String },
    #[error("{owner}: ICMP type/code need protocol icmp (IPv4) or icmpv6 (IPv6)")]
    IcmpFieldsWithoutIcmp { owner: String },
    #[error("{owner}: ICMP code without ICMP type")]
    IcmpCodeWithoutType { owner: String },
    #[error("{owner}: bad CIDR {value:?}")]
    BadCidr { owner: String, value: String },
    #[error("{owner}: remote CIDR {value:?} is not {ethertype:?}, so the rule can never match")]
    CidrFamily {
        owner: String,
        value: String,
        ethertype: EtherType,
    },
    #[error("{owner}: give one of remote_cidr, remote_group and remote_address_group")]
    BothRemotes { owner: String },
    #[error("{owner}: unknown address group {group:?}")]
    UnknownAddressGroup { owner: String, group: String },
    #[error("{owner}: unknown port set {set:?}")]
    UnknownPortSet { owner: String, set: String },
    #[error("{owner}: give port_min/port_max or port_set, not both")]
    BothPortMatches { owner: String },
    #[error("Address group {group:?}: bad CIDR {value:?} (host bits must be zero)")]
    BadAddressGroupCidr { group: String, value: String },
    #[error("Port set {set:?}: port range {min}..={max} is empty")]
    PortSetRangeOutOfOrder { set: String, min: u16, max: u16 },
    #[error("{kind} {name:?} is defined twice")]
    DuplicateName { kind: &'static str, name: String },
    #[error("{owner} conflicts with {other}: same match and priority, opposite actions")]
    ConflictingRules { owner: String, other: String },
    #[error("Conntrack zone ids of {first:?} and {second:?} collide; rename one")]
    ZoneCollision { first: String, second: String },
}

/// A stable connection-tracking zone id, from a kind ("port", "router") and a name.
///
/// Stable across applies (indices are not), so connections survive
/// unrelated configuration changes. FNV-1a; collisions are rejected at
/// compile time ([`SecurityError::ZoneCollision`]).
pub fn zone_id(kind: &str, name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in kind.bytes().chain([b':']).chain(name.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Sorted, disjoint, non-adjacent inclusive intervals: a set of addresses
/// (an address group) or ports (a port set) with an O(log n) membership test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges<T>(Arc<[(T, T)]>);

impl<T: Copy + Ord + Default + num_step::Step> Ranges<T> {
    /// Sorts and merges overlapping or touching intervals (`lo <= hi` each).
    pub fn new(mut intervals: Vec<(T, T)>) -> Ranges<T> {
        intervals.sort_unstable();
        let mut merged: Vec<(T, T)> = Vec::with_capacity(intervals.len());
        for (lo, hi) in intervals {
            match merged.last_mut() {
                Some(last) if last.1.next().is_none_or(|n| lo <= n) => {
                    last.1 = last.1.max(hi);
                }
                _ => merged.push((lo, hi)),
            }
        }
        Ranges(merged.into())
    }

    // hot path (new connections only): one binary search, no allocation.
    pub fn contains(&self, x: T) -> bool {
        let i = self.0.partition_point(|&(lo, _)| lo <= x);
        i > 0 && self.0.get(i - 1).is_some_and(|&(_, hi)| x <= hi)
    }

    pub fn intervals(&self) -> &[(T, T)] {
        &self.0
    }
}

/// The successor of an interval end, for merging touching intervals.
mod num_step {
    pub trait Step: Sized {
        fn next(self) -> Option<Self>;
    }
    impl Step for u16 {
        fn next(self) -> Option<u16> {
            self.checked_add(1)
        }
    }
    impl Step for u128 {
        fn next(self) -> Option<u128> {
            self.checked_add(1)
        }
    }
}

/// An address set a rule's far end must be in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    Any,
    /// (address, mask), IPv4-mapped for IPv4.
    Cidr(u128, u128),
    /// Sorted addresses of a group's ports.
    Set(Arc<[u128]>),
    /// An address group's prefixes of the rule's family, as address intervals.
    Prefixes(Ranges<u128>),
}

/// The destination ports a TCP/UDP rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// One inclusive range (`0..=65535` when the rule names none).
    Range(u16, u16),
    /// A port set's ranges.
    Set(Ranges<u16>),
}

impl Ports {
    pub const ANY: Ports = Ports::Range(0, u16::MAX);

    fn contains(&self, port: u16) -> bool {
        match self {
            Ports::Range(lo, hi) => (*lo..=*hi).contains(&port),
            Ports::Set(set) => set.contains(port),
        }
    }
}

/// The match part of a compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub v6: bool,
    pub proto: Option<u8>,
    pub ports: Ports,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub remote: Remote,
}

/// What a rule looks at in a packet (the connection's first packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleInput {
    pub v6: bool,
    pub proto: u8,
    /// The far end: source for ingress rules, destination for egress.
    pub remote: u128,
    pub dport: u16,
    pub icmp: Option<(u8, u8)>,
}

impl Match {
    // hot path (new connections only): a few compares per rule.
    pub fn matches(&self, x: &RuleInput) -> bool {
        if self.v6 != x.v6 || self.proto.is_some_and(|p| p != x.proto) {
            return false;
        }
        if (x.proto == IPPROTO_TCP || x.proto == IPPROTO_UDP) && !self.ports.contains(x.dport) {
            return false;
        }
        if let Some(t) = self.icmp_type {
            match x.icmp {
                Some((ty, code)) if ty == t && self.icmp_code.is_none_or(|c| c == code) => {}
                _ => return false,
            }
        }
        match &self.remote {
            Remote::Any => true,
            Remote::Cidr(addr, mask) => x.remote & mask == *addr,
            Remote::Set(set) => set.binary_search(&x.remote).is_ok(),
            Remote::Prefixes(set) => set.contains(x.remote),
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub m: Match,
    pub allow: bool,
    pub priority: u32,
    /// Index into [`RuleCounters`].
    pub counter: usize,
}

/// A port's compiled security groups.
#[derive(Debug, Clone)]
pub struct PortAcl {
    pub zone: u32,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// The verdict of the rules on a connection's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclVerdict {
    pub allow: bool,
    /// The deciding rule's counter; `None` = the default applied.
    pub rule: Option<usize>,
}

impl PortAcl {
    /// First matching rule decides; otherwise ingress is denied and egress allowed.
    pub fn decide(&self, ingress: bool, x: &RuleInput) -> AclVerdict {
        let rules = if ingress { &self.ingress } else { &self.egress };
        match rules.iter().find(|r| r.m.matches(x)) {
            Some(r) => AclVerdict {
                allow: r.allow,
                rule: Some(r.counter),
            },
            None => AclVerdict {
                allow: !ingress,
                rule: None,
            },
        }
    }
}

/// Names and hit counters of every compiled rule (security groups and
/// router firewall), shared by all workers of one table generation.
#[derive(Debug, Clone, Default)]
pub struct RuleCounters {
    pub names: Arc<[RuleName]>,
    pub hits: Arc<[AtomicU64]>,
}

/// Which configured rule a counter belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleName {
    /// `security_group` or `firewall`.
    pub kind: String,
    /// Group or router name.
    pub owner: String,
    /// Index of the rule in its group (or in the router's firewall rules).
    pub index: usize,
}

/// Parses a protocol name or number; `None` = any.
pub fn parse_protocol(owner: &str, value: Option<&str>) -> Result<Option<u8>, SecurityError> {
    let Some(v) = value else { return Ok(None) };
    Ok(match v.to_ascii_lowercase().as_str() {
        "any" => None,
        "tcp" => Some(IPPROTO_TCP),
        "udp" => Some(IPPROTO_UDP),
        "icmp" => Some(IPPROTO_ICMP),
        "icmpv6" | "ipv6-icmp" => Some(IPPROTO_ICMPV6),
        n => Some(n.parse::<u8>().map_err(|_| SecurityError::BadProtocol {
            owner: owner.to_string(),
            value: v.to_string(),
        })?),
    })
}

/// Parses `addr/len` (IPv4 or IPv6) into a masked (address, mask) pair.
pub fn parse_cidr(owner: &str, value: &str) -> Result<(u128, u128, bool), SecurityError> {
    let bad = || SecurityError::BadCidr {
        owner: owner.to_string(),
        value: value.to_string(),
    };
    let (addr, len) = value.split_once('/').unwrap_or((value, ""));
    let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let (addr, max, v6) = match ip {
        std::net::IpAddr::V4(a) => (from_v4(a), 32u8, false),
        std::net::IpAddr::V6(a) => (u128::from(a), 128u8, true),
    };
    let len: u8 = if len.is_empty() {
        max
    } else {
        len.parse().ok().filter(|l| *l <= max).ok_or_else(bad)?
    };
    let host_bits = u32::from(max - len);
    let mask = if host_bits >= 128 {
        0
    } else {
        u128::MAX << host_bits
    };
    // IPv4-mapped: the mapping prefix always matches.
    let mask = if v6 { mask } else { mask | !0xffff_ffffu128 };
    Ok((addr & mask, mask, v6))
}

/// Checks a destination port range; (0, 65535) when unset.
pub fn port_range(
    owner: &str,
    proto: Option<u8>,
    min: Option<u16>,
    max: Option<u16>,
) -> Result<(u16, u16), SecurityError> {
    if min.is_none() && max.is_none() {
        return Ok((0, u16::MAX));
    }
    if !matches!(proto, Some(IPPROTO_TCP | IPPROTO_UDP)) {
        return Err(SecurityError::PortsWithoutTcpUdp {
            owner: owner.to_string(),
        });
    }
    let (lo, hi) = (min.unwrap_or(0), max.or(min).unwrap_or(u16::MAX));
    if lo > hi {
        return Err(SecurityError::PortRangeOutOfOrder {
            owner: owner.to_string(),
            min: lo,
            max: hi,
        });
    }
    Ok((lo, hi))
}

/// Address groups and port sets compiled once per apply, by name.
#[derive(Default)]
struct Sets<'a> {
    /// Per address group: (IPv4-mapped intervals, IPv6 intervals).
    addresses: HashMap<&'a str, (Ranges<u128>, Ranges<u128>)>,
    ports: HashMap<&'a str, Ranges<u16>>,
}

fn compile_sets(desired: &DesiredState) -> Result<Sets<'_>, SecurityError> {
    let mut sets = Sets::default();
    for g in &desired.address_groups {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for a in &g.addresses {
            let bad = || SecurityError::BadAddressGroupCidr {
                group: g.name.clone(),
                value: a.clone(),
            };
            let (addr, mask, is_v6) = parse_cidr(&g.name, a).map_err(|_| bad())?;
            // parse_cidr masks host bits off; a group with them set is a typo.
            let given = a.split('/').next().and_then(|h| h.parse().ok());
            let given = match given {
                Some(std::net::IpAddr::V4(x)) => from_v4(x),
                Some(std::net::IpAddr::V6(x)) => u128::from(x),
                None => return Err(bad()),
            };
            if given != addr {
                return Err(bad());
            }
            let interval = (addr, addr | !mask);
            if is_v6 { &mut v6 } else { &mut v4 }.push(interval);
        }
        let compiled = (Ranges::new(v4), Ranges::new(v6));
        if sets.addresses.insert(g.name.as_str(), compiled).is_some() {
            return Err(SecurityError::DuplicateName {
                kind: "Address group",
                name: g.name.clone(),
            });
        }
    }
    for p in &desired.port_sets {
        let mut intervals = Vec::with_capacity(p.ports.len());
        for r in &p.ports {
            if r.min > r.max {
                return Err(SecurityError::PortSetRangeOutOfOrder {
                    set: p.name.clone(),
                    min: r.min,
                    max: r.max,
                });
            }
            intervals.push((r.min, r.max));
        }
        if sets
            .ports
            .insert(p.name.as_str(), Ranges::new(intervals))
            .is_some()
        {
            return Err(SecurityError::DuplicateName {
                kind: "Port set",
                name: p.name.clone(),
            });
        }
    }
    Ok(sets)
}

fn compile_rule(
    owner: &str,
    r: &SecurityRuleSpec,
    group_addrs: &HashMap<&str, Arc<[u128]>>,
    sets: &Sets<'_>,
    counter: usize,
) -> Result<Rule, SecurityError> {
    let v6 = r.ethertype == EtherType::Ipv6;
    let proto = parse_protocol(owner, r.protocol.as_deref())?;
    let (lo, hi) = port_range(owner, proto, r.port_min, r.port_max)?;
    let ports = match &r.port_set {
        None => Ports::Range(lo, hi),
        Some(_) if r.port_min.is_some() || r.port_max.is_some() => {
            return Err(SecurityError::BothPortMatches {
                owner: owner.to_string(),
            })
        }
        Some(_) if !matches!(proto, Some(IPPROTO_TCP | IPPROTO_UDP)) => {
            return Err(SecurityError::PortsWithoutTcpUdp {
                owner: owner.to_string(),
            })
        }
        Some(name) => Ports::Set(sets.ports.get(name.as_str()).cloned().ok_or_else(|| {
            SecurityError::UnknownPortSet {
                owner: owner.to_string(),
                set: name.clone(),
            }
        })?),
    };
    if r.icmp_type.is_some() || r.icmp_code.is_some() {
        let icmp = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
        if proto != Some(icmp) {
            return Err(SecurityError::IcmpFieldsWithoutIcmp {
                owner: owner.to_string(),
            });
        }
        if r.icmp_type.is_none() {
            return Err(SecurityError::IcmpCodeWithoutType {
                owner: owner.to_string(),
            });
        }
    }
    let remote = match (&r.remote_cidr, &r.remote_group, &r.remote_address_group) {
        (Some(c), None, None) => {
            let (addr, mask, cidr_v6) = parse_cidr(owner, c)?;
            if cidr_v6 != v6 {
                return Err(SecurityError::CidrFamily {
                    owner: owner.to_string(),
                    value: c.clone(),
                    ethertype: r.ethertype,
                });
            }
            Remote::Cidr(addr, mask)
        }
        (None, Some(g), None) => Remote::Set(Arc::clone(group_addrs.get(g.as_str()).ok_or_else(
            || SecurityError::UnknownRemoteGroup {
                owner: owner.to_string(),
                remote: g.clone(),
            },
        )?)),
        (None, None, Some(name)) => {
            let (v4, v6set) = sets.addresses.get(name.as_str()).ok_or_else(|| {
                SecurityError::UnknownAddressGroup {
                    owner: owner.to_string(),
                    group: name.clone(),
                }
            })?;
            // The group's prefixes of the rule's family; none: never matches
            // (until the group gains some: it may change at any time).
            Remote::Prefixes(if v6 { v6set.clone() } else { v4.clone() })
        }
        (None, None, None) => Remote::Any,
        _ => {
            return Err(SecurityError::BothRemotes {
                owner: owner.to_string(),
            })
        }
    };
    Ok(Rule {
        m: Match {
            v6,
            proto,
            ports,
            icmp_type: r.icmp_type,
            icmp_code: r.icmp_code,
            remote,
        },
        allow: r.action == RuleAction::Allow,
        priority: r.priority,
        counter,
    })
}

/// Compiles the security groups: a [`PortAcl`] per logical port in a group
/// (indexed like `lports`), plus the rule names (counters are appended to
/// `names`).
pub fn compile(
    desired: &DesiredState,
    lports: &[Lport],
    names: &mut Vec<RuleName>,
) -> Result<Vec<Option<PortAcl>>, SecurityError> {
    let mut acls: Vec<Option<PortAcl>> = vec![None; lports.len()];
    if desired.security_groups.is_empty() {
        return Ok(acls);
    }
    let port_id: HashMap<&str, usize> = lports
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name.as_str(), i))
        .collect();
    // Every group's member addresses, for remote-group rules.
    let mut group_addrs: HashMap<&str, Arc<[u128]>> = HashMap::new();
    for g in &desired.security_groups {
        let mut addrs = Vec::new();
        for p in &g.ports {
            let lp = port_id
                .get(p.as_str())
                .and_then(|i| lports.get(*i))
                .ok_or_else(|| SecurityError::UnknownPort {
                    group: g.name.clone(),
                    port: p.clone(),
                })?;
            addrs.extend(lp.ips.iter().map(|a| from_v4(*a)));
            addrs.extend(lp.ips6.iter().map(|a| u128::from(*a)));
        }
        addrs.sort_unstable();
        addrs.dedup();
        group_addrs.insert(g.name.as_str(), addrs.into());
    }
    let sets = compile_sets(desired)?;
    let mut zones: HashMap<u32, String> = HashMap::new();
    for g in &desired.security_groups {
        let mut compiled = Vec::with_capacity(g.rules.len());
        for (i, r) in g.rules.iter().enumerate() {
            let owner = format!("Security group {:?} rule {i}", g.name);
            let rule = compile_rule(&owner, r, &group_addrs, &sets, names.len())?;
            if let Some((j, _)) =
                compiled
                    .iter()
                    .enumerate()
                    .find(|(_, (d, o)): &(usize, &(RuleDirection, Rule))| {
                        *d == r.direction
                            && o.priority == rule.priority
                            && o.m == rule.m
                            && o.allow != rule.allow
                    })
            {
                return Err(SecurityError::ConflictingRules {
                    owner,
                    other: format!("rule {j}"),
                });
            }
            names.push(RuleName {
                kind: "security_group".into(),
                owner: g.name.clone(),
                index: i,
            });
            compiled.push((r.direction, rule));
        }
        let mut seen = HashSet::new();
        for p in &g.ports {
            let Some(&id) = port_id.get(p.as_str()) else {
                continue;
            };
            if !seen.insert(id) {
                continue;
            }
            let zone = zone_id("port", p);
            if let Some(first) = zones.insert(zone, p.clone()).filter(|f| f != p) {
                return Err(SecurityError::ZoneCollision {
                    first,
                    second: p.clone(),
                });
            }
            let Some(slot) = acls.get_mut(id) else {
                continue;
            };
            let acl = slot.get_or_insert_with(|| PortAcl {
                zone,
                ingress: Vec::new(),
                egress: Vec::new(),
            });
            for (dir, rule) in &compiled {
                match dir {
                    RuleDirection::Ingress => acl.ingress.push(rule.clone()),
                    RuleDirection::Egress => acl.egress.push(rule.clone()),
                }
            }
        }
    }
    for acl in acls.iter_mut().flatten() {
        for rules in [&mut acl.ingress, &mut acl.egress] {
            // Higher priority first; deny before allow on a tie (stable otherwise).
            rules.sort_by_key(|r| (std::cmp::Reverse(r.priority), r.allow));
        }
    }
    Ok(acls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::key::v4;

    fn input(remote: [u8; 4], proto: u8, dport: u16) -> RuleInput {
        RuleInput {
            v6: false,
            proto,
            remote: v4(remote),
            dport,
            icmp: None,
        }
    }

    #[test]
    fn cidr_ports_and_priorities() {
        let (a, m, v6) = parse_cidr("t", "10.1.0.0/16").unwrap();
        assert!(!v6);
        let rule = |prio, allow, remote| Rule {
            m: Match {
                v6: false,
                proto: Some(IPPROTO_TCP),
                ports: Ports::Range(22, 22),
                icmp_type: None,
                icmp_code: None,
                remote,
            },
            allow,
            priority: prio,
            counter: 0,
        };
        let mut acl = PortAcl {
            zone: 1,
            ingress: vec![
                rule(10, true, Remote::Cidr(a, m)),
                rule(20, false, Remote::Set(vec![v4([10, 1, 2, 3])].into())),
            ],
            egress: vec![],
        };
        acl.ingress
            .sort_by_key(|r| (std::cmp::Reverse(r.priority), r.allow));
        assert!(acl.decide(true, &input([10, 1, 9, 9], 6, 22)).allow);
        assert!(!acl.decide(true, &input([10, 1, 2, 3], 6, 22)).allow);
        assert!(
            !acl.decide(true, &input([10, 2, 0, 1], 6, 22)).allow,
            "default deny"
        );
        assert!(!acl.decide(true, &input([10, 1, 9, 9], 6, 23)).allow);
        assert!(
            acl.decide(false, &input([8, 8, 8, 8], 17, 53)).allow,
            "default allow egress"
        );
    }

    #[test]
    fn bad_rules_are_rejected_precisely() {
        assert!(matches!(
            port_range("r", Some(IPPROTO_TCP), Some(90), Some(80)),
            Err(SecurityError::PortRangeOutOfOrder { .. })
        ));
        assert!(matches!(
            port_range("r", Some(IPPROTO_ICMP), Some(80), None),
            Err(SecurityError::PortsWithoutTcpUdp { .. })
        ));
        assert!(matches!(
            parse_protocol("r", Some("sctpx")),
            Err(SecurityError::BadProtocol { .. })
        ));
        assert_eq!(parse_protocol("r", Some("132")).unwrap(), Some(132));
        assert!(parse_cidr("r", "10.0.0.0/33").is_err());
        assert_ne!(zone_id("port", "a"), zone_id("router", "a"));
    }

    fn sets_state() -> DesiredState {
        use crate::model::{AddressGroupSpec, PortRangeSpec, PortSetSpec};
        DesiredState {
            address_groups: vec![AddressGroupSpec {
                name: "trusted".into(),
                addresses: ["10.1.0.0/16", "192.0.2.7/32", "10.1.4.0/24", "fd00:1::/64"]
                    .map(String::from)
                    .to_vec(),
            }],
            port_sets: vec![PortSetSpec {
                name: "web".into(),
                ports: vec![
                    PortRangeSpec {
                        min: 8000,
                        max: 8099,
                    },
                    PortRangeSpec { min: 80, max: 80 },
                    PortRangeSpec {
                        min: 8100,
                        max: 8100,
                    },
                ],
            }],
            ..DesiredState::default()
        }
    }

    fn set_rule(v6: bool, proto: &str) -> SecurityRuleSpec {
        SecurityRuleSpec {
            direction: RuleDirection::Ingress,
            ethertype: if v6 { EtherType::Ipv6 } else { EtherType::Ipv4 },
            protocol: Some(proto.into()),
            port_min: None,
            port_max: None,
            icmp_type: None,
            icmp_code: None,
            remote_cidr: None,
            remote_group: None,
            remote_address_group: Some("trusted".into()),
            port_set: Some("web".into()),
            priority: 0,
            action: RuleAction::Allow,
        }
    }

    #[test]
    fn ranges_merge_touching_intervals_and_find_edges() {
        let r = Ranges::new(vec![(10u16, 20), (21, 30), (5, 7), (40, 50), (45, 60)]);
        assert_eq!(r.intervals(), &[(5, 7), (10, 30), (40, 60)]);
        for (x, inside) in [
            (4, false),
            (5, true),
            (7, true),
            (8, false),
            (9, false),
            (10, true),
            (30, true),
            (31, false),
            (39, false),
            (60, true),
            (61, false),
        ] {
            assert_eq!(r.contains(x), inside, "{x}");
        }
        let ends = Ranges::new(vec![(u16::MAX, u16::MAX), (0, 0)]);
        assert!(ends.contains(0) && ends.contains(u16::MAX) && !ends.contains(1));
        let all = Ranges::new(vec![(0u128, u128::MAX), (5, 9)]);
        assert_eq!(all.intervals(), &[(0, u128::MAX)]);
        assert!(!Ranges::<u16>::new(Vec::new()).contains(0));
    }

    #[test]
    fn address_group_and_port_set_rules_match_any_member() {
        let desired = sets_state();
        let sets = compile_sets(&desired).unwrap();
        let groups = HashMap::new();
        let rule = compile_rule("t", &set_rule(false, "tcp"), &groups, &sets, 0).unwrap();
        assert!(
            matches!(&rule.m.ports, Ports::Set(s) if s.intervals() == [(80, 80), (8000, 8100)])
        );
        let hit = |remote: [u8; 4], dport| rule.m.matches(&input(remote, IPPROTO_TCP, dport));
        assert!(hit([10, 1, 0, 0], 80));
        assert!(hit([10, 1, 255, 255], 8000));
        assert!(hit([192, 0, 2, 7], 8100));
        assert!(hit([10, 1, 4, 9], 8099));
        assert!(!hit([10, 2, 0, 0], 80), "outside every prefix");
        assert!(!hit([10, 0, 255, 255], 80), "just below 10.1/16");
        assert!(!hit([192, 0, 2, 8], 80), "next to the host prefix");
        assert!(!hit([10, 1, 0, 1], 81), "port between the ranges");
        assert!(!hit([10, 1, 0, 1], 8101), "just above the set");
        assert!(
            !rule.m.matches(&input([10, 1, 0, 1], IPPROTO_UDP, 80)),
            "tcp only"
        );
        // IPv6: only the group's IPv6 prefix.
        let rule6 = compile_rule("t", &set_rule(true, "udp"), &groups, &sets, 0).unwrap();
        let v6 = |a: &str, dport| RuleInput {
            v6: true,
            proto: IPPROTO_UDP,
            remote: u128::from(a.parse::<std::net::Ipv6Addr>().unwrap()),
            dport,
            icmp: None,
        };
        assert!(rule6.m.matches(&v6("fd00:1::ffff", 8050)));
        assert!(!rule6.m.matches(&v6("fd00:2::1", 8050)));
        assert!(!rule6.m.matches(&v6("fd00:1::1", 79)));
        // A group without addresses of the rule's family never matches.
        let mut only_v4 = desired.clone();
        only_v4.address_groups[0]
            .addresses
            .retain(|a| !a.contains(':'));
        let sets = compile_sets(&only_v4).unwrap();
        let rule6 = compile_rule("t", &set_rule(true, "udp"), &groups, &sets, 0).unwrap();
        assert!(!rule6.m.matches(&v6("fd00:1::1", 80)));
    }

    #[test]
    fn bad_sets_and_set_rules_are_rejected_precisely() {
        let desired = sets_state();
        let sets = compile_sets(&desired).unwrap();
        let groups = HashMap::new();
        let fail = |r: SecurityRuleSpec| compile_rule("t", &r, &groups, &sets, 0).unwrap_err();
        assert!(matches!(
            fail(SecurityRuleSpec {
                port_min: Some(80),
                ..set_rule(false, "tcp")
            }),
            SecurityError::BothPortMatches { .. }
        ));
        assert!(matches!(
            fail(set_rule(false, "icmp")),
            SecurityError::PortsWithoutTcpUdp { .. }
        ));
        assert!(matches!(
            fail(SecurityRuleSpec {
                remote_cidr: Some("10.0.0.0/8".into()),
                ..set_rule(false, "tcp")
            }),
            SecurityError::BothRemotes { .. }
        ));
        assert!(matches!(
            fail(SecurityRuleSpec {
                remote_address_group: Some("nope".into()),
                ..set_rule(false, "tcp")
            }),
            SecurityError::UnknownAddressGroup { .. }
        ));
        assert!(matches!(
            fail(SecurityRuleSpec {
                port_set: Some("nope".into()),
                ..set_rule(false, "tcp")
            }),
            SecurityError::UnknownPortSet { .. }
        ));
        let mut bad = desired.clone();
        bad.address_groups[0].addresses.push("10.9.0.1/16".into());
        assert!(matches!(
            compile_sets(&bad).err(),
            Some(SecurityError::BadAddressGroupCidr { .. })
        ));
        let mut bad = desired.clone();
        bad.port_sets[0].ports[0].min = 9000;
        assert!(matches!(
            compile_sets(&bad).err(),
            Some(SecurityError::PortSetRangeOutOfOrder { .. })
        ));
        let mut bad = desired.clone();
        bad.port_sets.push(bad.port_sets[0].clone());
        assert!(matches!(
            compile_sets(&bad).err(),
            Some(SecurityError::DuplicateName { .. })
        ));
    }
}
