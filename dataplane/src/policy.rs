//! Router policies (policy routing and security-service chaining): match
//! routed IPv4 traffic on ingress switch, source/destination CIDR and
//! protocol, highest priority first, and allow it (normal routing), drop
//! it, or reroute it to a next hop on an attached subnet: e.g. through a
//! firewall VM, which routes it back to the router to continue. OVN's
//! `Logical_Router_Policy`.
//!
//! # Design
//!
//! - Policies are compiled per router, sorted by priority, into the
//!   immutable tables; the router stage checks them after NAT's pre-routing
//!   step (so DNAT'd destinations are seen) and before the route lookup.
//!   Traffic no policy matches is routed normally.
//! - A chain is expressed with `from_switch`: "traffic from the clients'
//!   switch to the servers goes to the firewall"; what the firewall sends
//!   back arrives from its own switch and routes normally (or matches the
//!   next policy of the chain).
//! - Hit counters are counted per worker and folded once per round into
//!   the tables' atomics (`{"op":"policy_stats"}`), like the QoS meters:
//!   policies are evaluated per packet (there is no connection state here).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::lpm::Prefix;

/// Most policies per data plane (the worker's hit counters are pre-allocated).
pub const MAX_POLICIES: usize = 1024;

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    Allow,
    Drop,
    /// Forward to `next_hop` instead of the routing table's choice.
    Reroute,
}

/// A router policy. Unset match fields match anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterPolicySpec {
    pub router: String,
    /// Higher first.
    pub priority: u32,
    /// The switch the packet entered the router from.
    #[serde(default)]
    pub from_switch: Option<String>,
    #[serde(default)]
    pub src_cidr: Option<String>,
    #[serde(default)]
    pub dst_cidr: Option<String>,
    /// `tcp`, `udp`, `icmp`, `any` or an IP protocol number.
    #[serde(default)]
    pub protocol: Option<String>,
    pub action: PolicyAction,
    /// For `reroute`: an address on one of the router's subnets.
    #[serde(default)]
    pub next_hop: Option<String>,
}

/// Why a policy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("Policy {index}: unknown router {router:?}")]
    UnknownRouter { index: usize, router: String },
    #[error("Policy {index}: switch {switch:?} is not attached to router {router:?}")]
    SwitchNotOnRouter {
        index: usize,
        router: String,
        switch: String,
    },
    #[error("Policy {index}: bad {field} {value:?} (want IPv4 a.b.c.d/len with host bits zero)")]
    BadCidr {
        index: usize,
        field: &'static str,
        value: String,
    },
    #[error("Policy {index}: {field} {value:?} is IPv6; router policies are IPv4")]
    WrongFamily {
        index: usize,
        field: &'static str,
        value: String,
    },
    #[error("Policy {index}: bad protocol {value:?}")]
    BadProtocol { index: usize, value: String },
    #[error("Policy {index}: reroute needs a next_hop")]
    RerouteWithoutNextHop { index: usize },
    #[error("Policy {index}: next_hop is only for reroute")]
    NextHopWithoutReroute { index: usize },
    #[error("Policy {index}: next hop {next_hop} is on none of router {router:?}'s subnets")]
    UnreachableNextHop {
        index: usize,
        router: String,
        next_hop: Ipv4Addr,
    },
    #[error("Policies {first} and {second} of router {router:?}: same priority and match, different actions")]
    Conflict {
        router: String,
        first: usize,
        second: usize,
    },
    #[error("More than {MAX_POLICIES} router policies")]
    TooMany,
}

/// What a compiled policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Drop,
    Reroute { switch: u32, next_hop: Ipv4Addr },
}

/// A compiled policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Index in the desired state's `router_policies` (hit counters, traces).
    pub index: usize,
    pub priority: u32,
    /// Ingress gateway address (identifies the ingress switch).
    pub from_gateway: Option<Ipv4Addr>,
    pub src: Option<Prefix>,
    pub dst: Option<Prefix>,
    pub proto: Option<u8>,
    pub action: Action,
}

impl Policy {
    // hot path: a few compares.
    fn matches(&self, gw: Ipv4Addr, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> bool {
        self.from_gateway.is_none_or(|g| g == gw)
            && self.src.is_none_or(|p| p.contains(src))
            && self.dst.is_none_or(|p| p.contains(dst))
            && self.proto.is_none_or(|p| p == proto)
    }
}

/// Policies per router (indexed like `Tables::routers`), highest priority first.
#[derive(Debug, Default)]
pub struct PolicyTables {
    pub routers: Vec<Vec<Policy>>,
    /// Hit counters, indexed like the desired state's `router_policies`.
    pub hits: Vec<AtomicU64>,
}

impl Clone for PolicyTables {
    fn clone(&self) -> Self {
        PolicyTables {
            routers: self.routers.clone(),
            hits: self.hits.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl PolicyTables {
    /// The first matching policy of `router` (and its counter slot).
    // hot path: one empty-slice check for routers without policies.
    pub fn lookup(
        &self,
        router: u32,
        gw: Ipv4Addr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
    ) -> Option<&Policy> {
        self.routers
            .get(router as usize)?
            .iter()
            .find(|p| p.matches(gw, src, dst, proto))
    }

    /// Hit counts per policy, by index in the desired state.
    pub fn stats(&self) -> Vec<PolicyStats> {
        self.hits
            .iter()
            .enumerate()
            .map(|(policy, h)| PolicyStats {
                policy,
                hits: h.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// One policy's hit counter, as reported by `{"op":"policy_stats"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStats {
    /// Index in `router_policies`.
    pub policy: usize,
    pub hits: u64,
}

/// A router as policies see it: name, attached (switch name, id, subnet, gateway IP).
pub struct RouterView<'a> {
    pub name: &'a str,
    pub attached: Vec<(&'a str, u32, Prefix, Ipv4Addr)>,
}

fn cidr(
    index: usize,
    field: &'static str,
    v: &Option<String>,
) -> Result<Option<Prefix>, PolicyError> {
    let Some(v) = v else { return Ok(None) };
    if v.contains(':') {
        return Err(PolicyError::WrongFamily {
            index,
            field,
            value: v.clone(),
        });
    }
    v.parse::<Prefix>()
        .map(Some)
        .map_err(|()| PolicyError::BadCidr {
            index,
            field,
            value: v.clone(),
        })
}

/// Validates and compiles the policies.
pub fn compile(
    specs: &[RouterPolicySpec],
    routers: &[RouterView<'_>],
) -> Result<PolicyTables, PolicyError> {
    if specs.len() > MAX_POLICIES {
        return Err(PolicyError::TooMany);
    }
    let mut out: Vec<Vec<Policy>> = routers.iter().map(|_| Vec::new()).collect();
    for (index, s) in specs.iter().enumerate() {
        let rid = routers
            .iter()
            .position(|r| r.name == s.router)
            .ok_or_else(|| PolicyError::UnknownRouter {
                index,
                router: s.router.clone(),
            })?;
        let Some(r) = routers.get(rid) else {
            return Err(PolicyError::UnknownRouter {
                index,
                router: s.router.clone(),
            });
        };
        let from_gateway = match &s.from_switch {
            None => None,
            Some(sw) => Some(
                r.attached
                    .iter()
                    .find(|a| a.0 == sw)
                    .map(|a| a.3)
                    .ok_or_else(|| PolicyError::SwitchNotOnRouter {
                        index,
                        router: s.router.clone(),
                        switch: sw.clone(),
                    })?,
            ),
        };
        let proto = match s
            .protocol
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("any") => None,
            Some("tcp") => Some(6),
            Some("udp") => Some(17),
            Some("icmp") => Some(1),
            Some(n) => Some(n.parse::<u8>().map_err(|_| PolicyError::BadProtocol {
                index,
                value: n.to_string(),
            })?),
        };
        let action = match (s.action, &s.next_hop) {
            (PolicyAction::Reroute, None) => {
                return Err(PolicyError::RerouteWithoutNextHop { index })
            }
            (PolicyAction::Reroute, Some(nh)) => {
                if nh.contains(':') {
                    return Err(PolicyError::WrongFamily {
                        index,
                        field: "next_hop",
                        value: nh.clone(),
                    });
                }
                let next_hop: Ipv4Addr = nh.parse().map_err(|_| PolicyError::BadCidr {
                    index,
                    field: "next_hop",
                    value: nh.clone(),
                })?;
                let switch = r
                    .attached
                    .iter()
                    .find(|a| a.2.contains(next_hop))
                    .map(|a| a.1)
                    .ok_or_else(|| PolicyError::UnreachableNextHop {
                        index,
                        router: s.router.clone(),
                        next_hop,
                    })?;
                Action::Reroute { switch, next_hop }
            }
            (_, Some(_)) => return Err(PolicyError::NextHopWithoutReroute { index }),
            (PolicyAction::Allow, None) => Action::Allow,
            (PolicyAction::Drop, None) => Action::Drop,
        };
        let p = Policy {
            index,
            priority: s.priority,
            from_gateway,
            src: cidr(index, "src_cidr", &s.src_cidr)?,
            dst: cidr(index, "dst_cidr", &s.dst_cidr)?,
            proto,
            action,
        };
        let list = out.get_mut(rid).ok_or(PolicyError::TooMany)?;
        if let Some(other) = list.iter().find(|o| {
            o.priority == p.priority
                && o.from_gateway == p.from_gateway
                && o.src == p.src
                && o.dst == p.dst
                && o.proto == p.proto
                && o.action != p.action
        }) {
            return Err(PolicyError::Conflict {
                router: s.router.clone(),
                first: other.index,
                second: index,
            });
        }
        list.push(p);
    }
    for list in &mut out {
        // Stable: equal priorities keep configuration order.
        list.sort_by_key(|p| std::cmp::Reverse(p.priority));
    }
    Ok(PolicyTables {
        routers: out,
        hits: specs.iter().map(|_| AtomicU64::new(0)).collect(),
    })
}

/// A worker's policy hit counts, folded once per round.
pub struct PolicyState {
    hits: Vec<u64>,
    dirty: Vec<u16>,
}

impl Default for PolicyState {
    fn default() -> Self {
        PolicyState {
            hits: vec![0; MAX_POLICIES],
            dirty: Vec::with_capacity(MAX_POLICIES),
        }
    }
}

impl PolicyState {
    /// Counts a hit on policy `index`.
    // hot path: an index and an add.
    pub fn hit(&mut self, index: usize) {
        if let Some(h) = self.hits.get_mut(index) {
            if *h == 0 {
                if let Ok(i) = u16::try_from(index) {
                    self.dirty.push(i);
                }
            }
            *h += 1;
        }
    }

    /// Adds and zeroes the counts into the tables' counters. Counts of a
    /// round are always of the tables loaded for that round.
    pub fn fold(&mut self, t: &PolicyTables) {
        for i in self.dirty.drain(..) {
            let i = usize::from(i);
            let Some(h) = self.hits.get_mut(i) else {
                continue;
            };
            if let Some(shared) = t.hits.get(i) {
                shared.fetch_add(*h, Ordering::Relaxed);
            }
            *h = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile as compile_all, ConfigError};
    use crate::counters::DropReason;
    use crate::packet::build::icmp_echo;
    use crate::pipeline::{process, Learned, RecordTrace, Verdict};
    use crate::testutil::{interfaces, topology};

    fn spec(action: PolicyAction, next_hop: Option<&str>) -> RouterPolicySpec {
        RouterPolicySpec {
            router: "r".into(),
            priority: 10,
            from_switch: Some("a".into()),
            src_cidr: None,
            dst_cidr: Some("10.0.3.0/24".into()),
            protocol: Some("icmp".into()),
            action,
            next_hop: next_hop.map(Into::into),
        }
    }

    fn tables(p: Vec<RouterPolicySpec>) -> Result<crate::tables::Tables, ConfigError> {
        let mut s = topology();
        s.router_policies = p;
        compile_all(&s, &interfaces(), 1)
    }

    #[test]
    fn bad_policies_are_rejected_precisely() {
        let err = |p| tables(vec![p]).unwrap_err().to_string();
        assert_eq!(
            err(spec(PolicyAction::Reroute, None)),
            "Policy 0: reroute needs a next_hop"
        );
        assert_eq!(
            err(spec(PolicyAction::Drop, Some("10.0.2.10"))),
            "Policy 0: next_hop is only for reroute"
        );
        assert_eq!(
            err(spec(PolicyAction::Reroute, Some("192.168.0.1"))),
            "Policy 0: next hop 192.168.0.1 is on none of router \"r\"'s subnets"
        );
        let mut p = spec(PolicyAction::Allow, None);
        p.dst_cidr = Some("fd00::/64".into());
        assert_eq!(
            err(p),
            "Policy 0: dst_cidr \"fd00::/64\" is IPv6; router policies are IPv4"
        );
        let mut p = spec(PolicyAction::Allow, None);
        p.src_cidr = Some("10.0.1.5/24".into());
        assert!(err(p).contains("bad src_cidr"));
        let mut p = spec(PolicyAction::Allow, None);
        p.from_switch = Some("nope".into());
        assert!(err(p).contains("not attached"));
        let e = tables(vec![
            spec(PolicyAction::Allow, None),
            spec(PolicyAction::Drop, None),
        ])
        .unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Policy(PolicyError::Conflict {
                first: 0,
                second: 1,
                ..
            })
        ));
    }

    #[test]
    fn reroute_and_drop_follow_priority_and_count_hits() {
        // vm1 → vm4 (10.0.3.10) is rerouted to vm3 (10.0.2.10); a higher
        // priority drop for a single source wins over it.
        let mut drop_one = spec(PolicyAction::Drop, None);
        drop_one.priority = 20;
        drop_one.src_cidr = Some("10.0.1.99/32".into());
        let t = tables(vec![
            spec(PolicyAction::Reroute, Some("10.0.2.10")),
            drop_one,
        ])
        .unwrap();
        let mut l = Learned::new(16);
        let ping = icmp_echo(
            [2, 0, 0, 0, 0xff, 1],
            [2, 0, 0, 0, 0, 1],
            "10.0.1.10".parse().unwrap(),
            "10.0.3.10".parse().unwrap(),
            64,
            b"x",
        );
        let mut buf = vec![0u8; 2048];
        buf[..ping.len()].copy_from_slice(&ping);
        let mut len = ping.len();
        let mut tr = RecordTrace::default();
        let d = process(&t, &mut l, 0, &mut buf, &mut len, &mut tr);
        assert_eq!(d.verdict, Verdict::Unicast { port: 2 }, "{:?}", tr.steps);
        assert_eq!(&buf[0..6], &[2, 0, 0, 0, 0, 3], "to vm3's MAC");
        assert!(tr.steps.iter().any(|s| s.stage == "router_policy"));
        l.policy.fold(&t.policies);
        assert_eq!(t.policies.stats()[0].hits, 1);

        let mut t2 = topology();
        t2.ports[0].ips.push("10.0.1.99".into());
        let mut drop_one = spec(PolicyAction::Drop, None);
        drop_one.priority = 20;
        drop_one.src_cidr = Some("10.0.1.99/32".into());
        t2.router_policies = vec![spec(PolicyAction::Reroute, Some("10.0.2.10")), drop_one];
        let t2 = compile_all(&t2, &interfaces(), 2).unwrap();
        let spoof = icmp_echo(
            [2, 0, 0, 0, 0xff, 1],
            [2, 0, 0, 0, 0, 1],
            "10.0.1.99".parse().unwrap(),
            "10.0.3.10".parse().unwrap(),
            64,
            b"x",
        );
        let mut buf = vec![0u8; 2048];
        buf[..spoof.len()].copy_from_slice(&spoof);
        let mut len = spoof.len();
        let d = process(
            &t2,
            &mut l,
            0,
            &mut buf,
            &mut len,
            &mut RecordTrace::default(),
        );
        assert_eq!(d.verdict, Verdict::Drop(DropReason::PolicyDropped));
    }
}
