//! What a router does with the traffic it forwards, besides routing it:
//! its firewall (allow/deny by protocol, addresses and destination ports;
//! higher priority first; what no rule matches passes) and its policies
//! (policy routing and service chaining: match source, destination and
//! protocol, then allow, drop or reroute to a next hop, e.g. a firewall
//! VM, ahead of the routing table). Both are IPv4, checked here as the data
//! plane checks them, so a stored router never makes a host's data plane
//! refuse its state.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::check_port_range;
use super::problem::ApiError;

/// Rules or policies one router holds at most (a host's data plane holds
/// 1024 policies over all its routers).
const MAX_PER_ROUTER: usize = 256;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FirewallProtocol {
    #[default]
    Any,
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FirewallAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    /// Higher first.
    #[serde(default)]
    pub priority: u32,
    #[serde(default)]
    pub protocol: FirewallProtocol,
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub src_cidr: Option<String>,
    /// Matched after DNAT (a floating IP's internal address).
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub dst_cidr: Option<String>,
    /// Destination ports, TCP/UDP only; both or neither.
    #[serde(default)]
    pub port_range_min: Option<u16>,
    #[serde(default)]
    pub port_range_max: Option<u16>,
    pub action: FirewallAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Drop,
    /// Forward to `nexthop` instead of the routing table's choice.
    Reroute,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterPolicy {
    /// Higher first.
    #[serde(default)]
    pub priority: u32,
    /// Only traffic entering the router from this attached subnet.
    #[serde(default)]
    pub from_subnet_id: Option<String>,
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub src_cidr: Option<String>,
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub dst_cidr: Option<String>,
    /// `tcp`, `udp`, `icmp`, `any` (default) or an IP protocol number.
    #[serde(default)]
    pub protocol: Option<String>,
    pub action: PolicyAction,
    /// For `reroute`: an address in a subnet attached to the router.
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub nexthop: Option<IpAddr>,
}

fn ipv4_cidr(field: String, value: &Option<String>) -> Result<(), ApiError> {
    let Some(v) = value else { return Ok(()) };
    let net: IpNet = v
        .parse()
        .map_err(|_| ApiError::invalid(field.clone(), format!("{v:?} is not a CIDR")))?;
    if !net.addr().is_ipv4() {
        return Err(ApiError::invalid(field, "IPv4 only"));
    }
    if net.trunc() != net {
        return Err(ApiError::invalid(
            field,
            format!("host bits set: did you mean {}?", net.trunc()),
        ));
    }
    Ok(())
}

pub fn check_firewall(rules: &[FirewallRule]) -> Result<(), ApiError> {
    if rules.len() > MAX_PER_ROUTER {
        return Err(ApiError::invalid(
            "firewall_rules",
            format!("at most {MAX_PER_ROUTER}"),
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        let field = |f: &str| format!("firewall_rules[{i}].{f}");
        ipv4_cidr(field("src_cidr"), &rule.src_cidr)?;
        ipv4_cidr(field("dst_cidr"), &rule.dst_cidr)?;
        check_port_range(
            field,
            rule.protocol != FirewallProtocol::Any,
            rule.port_range_min,
            rule.port_range_max,
        )?;
        if rules[..i].contains(rule) {
            return Err(ApiError::invalid(
                format!("firewall_rules[{i}]"),
                "duplicate rule",
            ));
        }
    }
    Ok(())
}

/// Checks policies against the router's attached subnets (`attached`:
/// subnet id and CIDR).
pub fn check_policies(
    policies: &[RouterPolicy],
    attached: &[(String, IpNet)],
) -> Result<(), ApiError> {
    if policies.len() > MAX_PER_ROUTER {
        return Err(ApiError::invalid(
            "policies",
            format!("at most {MAX_PER_ROUTER}"),
        ));
    }
    for (i, p) in policies.iter().enumerate() {
        let field = |f: &str| format!("policies[{i}].{f}");
        ipv4_cidr(field("src_cidr"), &p.src_cidr)?;
        ipv4_cidr(field("dst_cidr"), &p.dst_cidr)?;
        if let Some(proto) = &p.protocol {
            let named = matches!(proto.as_str(), "tcp" | "udp" | "icmp" | "any");
            if !named && proto.parse::<u8>().is_err() {
                return Err(ApiError::invalid(
                    field("protocol"),
                    "tcp, udp, icmp, any or an IP protocol number 0..=255",
                ));
            }
        }
        if let Some(s) = &p.from_subnet_id {
            if !attached.iter().any(|(id, _)| id == s) {
                return Err(ApiError::invalid(
                    field("from_subnet_id"),
                    format!("subnet {s} is not attached to the router"),
                ));
            }
        }
        match (p.action, p.nexthop) {
            (PolicyAction::Reroute, None) => {
                return Err(ApiError::invalid(
                    field("nexthop"),
                    "reroute needs a nexthop",
                ))
            }
            (PolicyAction::Reroute, Some(hop)) => {
                let on_subnet = hop.is_ipv4() && attached.iter().any(|(_, c)| c.contains(&hop));
                if !on_subnet {
                    return Err(ApiError::invalid(
                        field("nexthop"),
                        format!("{hop} is in no IPv4 subnet attached to the router"),
                    ));
                }
            }
            (_, Some(_)) => {
                return Err(ApiError::invalid(
                    field("nexthop"),
                    "only for action reroute",
                ))
            }
            (_, None) => {}
        }
        let proto = |r: &RouterPolicy| r.protocol.clone().filter(|p| p != "any");
        let same_match = |o: &RouterPolicy| {
            o.from_subnet_id == p.from_subnet_id
                && o.src_cidr == p.src_cidr
                && o.dst_cidr == p.dst_cidr
                && proto(o) == proto(p)
        };
        if let Some(j) = policies[..i]
            .iter()
            .position(|o| o.priority == p.priority && same_match(o))
        {
            return Err(ApiError::invalid(
                format!("policies[{i}]"),
                format!("same match and priority as policies[{j}]"),
            ));
        }
    }
    Ok(())
}
