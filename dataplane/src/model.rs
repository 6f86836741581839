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
    /// Serve DHCPv4 to the switch's bound ports (absent: no DHCP server).
    #[serde(default)]
    pub dhcp: Option<DhcpSpec>,
}

/// DHCPv4 options of a switch. Each bound port is offered its bound
/// address; the router option is the switch's gateway when a router is
/// attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSpec {
    /// Lease time in seconds.
    #[serde(default = "default_lease")]
    pub lease_secs: u32,
    /// DNS servers (option 6), at most 4.
    #[serde(default)]
    pub dns_servers: Vec<String>,
    /// Interface MTU (option 26).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Server identifier on a switch without a router (else the gateway's).
    #[serde(default)]
    pub server_ip: Option<String>,
}

impl Default for DhcpSpec {
    fn default() -> Self {
        DhcpSpec {
            lease_secs: default_lease(),
            dns_servers: Vec::new(),
            mtu: None,
            server_ip: None,
        }
    }
}

fn default_lease() -> u32 {
    86_400
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
