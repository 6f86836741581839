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
    #[error("{owner}: give remote_cidr or remote_group, not both")]
    BothRemotes { owner: String },
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

/// An address set a rule's far end must be in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    Any,
    /// (address, mask), IPv4-mapped for IPv4.
    Cidr(u128, u128),
    /// Sorted addresses of a group's ports.
    Set(Arc<[u128]>),
}

/// The match part of a compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub v6: bool,
    pub proto: Option<u8>,
    pub ports: (u16, u16),
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
        if (x.proto == IPPROTO_TCP || x.proto == IPPROTO_UDP)
            && !(self.ports.0..=self.ports.1).contains(&x.dport)
        {
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

fn compile_rule(
    owner: &str,
    r: &SecurityRuleSpec,
    group_addrs: &HashMap<&str, Arc<[u128]>>,
    counter: usize,
) -> Result<Rule, SecurityError> {
    let v6 = r.ethertype == EtherType::Ipv6;
    let proto = parse_protocol(owner, r.protocol.as_deref())?;
    let ports = port_range(owner, proto, r.port_min, r.port_max)?;
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
    let remote = match (&r.remote_cidr, &r.remote_group) {
        (Some(_), Some(_)) => {
            return Err(SecurityError::BothRemotes {
                owner: owner.to_string(),
            })
        }
        (Some(c), None) => {
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
        (None, Some(g)) => Remote::Set(Arc::clone(group_addrs.get(g.as_str()).ok_or_else(
            || SecurityError::UnknownRemoteGroup {
                owner: owner.to_string(),
                remote: g.clone(),
            },
        )?)),
        (None, None) => Remote::Any,
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
    let mut zones: HashMap<u32, String> = HashMap::new();
    for g in &desired.security_groups {
        let mut compiled = Vec::with_capacity(g.rules.len());
        for (i, r) in g.rules.iter().enumerate() {
            let owner = format!("Security group {:?} rule {i}", g.name);
            let rule = compile_rule(&owner, r, &group_addrs, names.len())?;
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
                ports: (22, 22),
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
}
