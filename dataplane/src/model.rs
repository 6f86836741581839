//! The declarative desired state: the one typed interface through which the
//! control plane (or a JSON file) configures the data plane.
//!
//! The caller always sends the whole state; [`crate::config::ConfigHandle::apply`]
//! validates it and swaps the compiled tables atomically, so there is no
//! partial update to reason about.

use serde::{Deserialize, Serialize};

/// Everything the data plane should forward.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    #[serde(default)]
    pub switches: Vec<SwitchSpec>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub routers: Vec<RouterSpec>,
}

/// A logical switch: one IPv4 subnet, optionally a VLAN ("classic" network).
/// Frames of a VLAN switch carry its 802.1Q tag on every interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSpec {
    pub name: String,
    /// `a.b.c.d/len`, host bits zero.
    pub subnet: String,
    /// 1..=4094; absent for untagged.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// Optional IPv6 prefix (`fd00:1::/64`) for IPv6 routing.
    #[serde(default)]
    pub subnet6: Option<String>,
}

/// A logical port: a VM NIC (or uplink) attached to a switch through a
/// data-plane interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: String,
    pub switch: String,
    /// The data-plane interface carrying this port's frames.
    pub interface: String,
    /// Bound MAC; absent for a port whose MACs are learned (uplinks, unknown VMs).
    #[serde(default)]
    pub mac: Option<String>,
    /// Bound addresses: IPv4 (ARP responder, port security, routing) and IPv6
    /// (ND responder, port security; not routed yet).
    #[serde(default)]
    pub ips: Vec<String>,
    /// Drop frames whose source MAC/IP is not bound. Needs `mac`.
    #[serde(default = "default_true")]
    pub port_security: bool,
}

fn default_true() -> bool {
    true
}

/// A distributed logical router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    pub name: String,
    pub ports: Vec<RouterPortSpec>,
    #[serde(default)]
    pub static_routes: Vec<StaticRouteSpec>,
}

/// A router's attachment to one switch: the subnet's gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterPortSpec {
    pub switch: String,
    /// Gateway MAC.
    pub mac: String,
    /// Gateway IPv4 address inside the switch's subnet.
    pub ip: String,
    /// Gateway IPv6 address inside the switch's `subnet6` (answered by ND).
    #[serde(default)]
    pub ip6: Option<String>,
}

/// `prefix` is reached via `next_hop`, a host on an attached subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRouteSpec {
    pub prefix: String,
    pub next_hop: String,
}
