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
    /// Stateful security groups and the ports in them ([`crate::security`]).
    #[serde(default)]
    pub security_groups: Vec<SecurityGroupSpec>,
    /// Named address lists security rules match as their far end
    /// (`remote_address_group`; Neutron's address groups).
    #[serde(default)]
    pub address_groups: Vec<AddressGroupSpec>,
    /// Named destination-port lists security rules match (`port_set`).
    #[serde(default)]
    pub port_sets: Vec<PortSetSpec>,
    /// SNAT / DNAT / floating IPs on routers ([`crate::nat`]).
    #[serde(default)]
    pub nat: Vec<NatRuleSpec>,
    /// Router firewall rules, applied to routed traffic ([`crate::nat`]).
    #[serde(default)]
    pub firewall: Vec<FirewallRuleSpec>,
    /// Rate limits and DSCP marking per port ([`crate::qos`]).
    #[serde(default)]
    pub qos: Vec<crate::qos::QosSpec>,
    /// Traffic mirror sessions ([`crate::mirror`]).
    #[serde(default)]
    pub mirrors: Vec<crate::mirror::MirrorSpec>,
    /// Stateful NAT64 per router ([`crate::nat64`]).
    #[serde(default)]
    pub nat64: Vec<crate::nat64::Nat64Spec>,
    /// Router policies: policy routing and service chains ([`crate::policy`]).
    #[serde(default)]
    pub router_policies: Vec<crate::policy::RouterPolicySpec>,
    /// L4 load balancers on routers ([`crate::lb4`]).
    #[serde(default)]
    pub load_balancers: Vec<crate::lb4::LoadBalancerSpec>,
    /// Overlay between hosts: VNIs, tunnel endpoints, remote ports ([`crate::overlay`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<Box<crate::overlay::OverlaySpec>>,
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

/// A security group: stateful rules applied to every member port.
///
/// A port in at least one group has the default semantics: ingress that no
/// rule allows is denied, egress that no rule denies is allowed. Replies of
/// an allowed connection always pass; a rule change re-checks established
/// connections on their next packet and cuts those now denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupSpec {
    pub name: String,
    /// Logical ports in this group (a port may be in several groups).
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub rules: Vec<SecurityRuleSpec>,
}

/// A named set of CIDRs (IPv4 and IPv6 mixed): a rule naming it matches a
/// far end inside any of them (those of the rule's ethertype). Compiled to
/// one sorted interval list per family, searched in O(log n).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressGroupSpec {
    pub name: String,
    /// `a.b.c.d/len` or `v6addr/len` (host bits must be zero).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// A named set of destination ports and port ranges (TCP and UDP rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSetSpec {
    pub name: String,
    #[serde(default)]
    pub ports: Vec<PortRangeSpec>,
}

/// An inclusive port range (`min == max` for one port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRangeSpec {
    pub min: u16,
    pub max: u16,
}

/// Traffic direction as seen from the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleDirection {
    /// Towards the port.
    Ingress,
    /// From the port.
    Egress,
}

/// IP version a rule applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EtherType {
    #[default]
    Ipv4,
    Ipv6,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    #[default]
    Allow,
    Deny,
}

/// One security-group rule. Unset match fields match anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityRuleSpec {
    pub direction: RuleDirection,
    #[serde(default)]
    pub ethertype: EtherType,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `any`, or an IP protocol number.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Destination port range (TCP/UDP), inclusive.
    #[serde(default)]
    pub port_min: Option<u16>,
    #[serde(default)]
    pub port_max: Option<u16>,
    #[serde(default)]
    pub icmp_type: Option<u8>,
    #[serde(default)]
    pub icmp_code: Option<u8>,
    /// The far end's address: `a.b.c.d/len` (or IPv6).
    #[serde(default)]
    pub remote_cidr: Option<String>,
    /// The far end is any port of this group (follows membership).
    #[serde(default)]
    pub remote_group: Option<String>,
    /// The far end is in this address group ([`AddressGroupSpec`]); one of
    /// `remote_cidr`, `remote_group`, `remote_address_group` at most.
    #[serde(default)]
    pub remote_address_group: Option<String>,
    /// Destination ports from this port set ([`PortSetSpec`]) instead of
    /// `port_min`/`port_max` (TCP/UDP only).
    #[serde(default)]
    pub port_set: Option<String>,
    /// Higher wins; on a tie, deny wins.
    #[serde(default)]
    pub priority: u32,
    #[serde(default)]
    pub action: RuleAction,
}

/// Kind of a NAT rule (OVN's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatKind {
    /// Sources in `logical_ip` (a CIDR) leave as `external_ip`, with a port
    /// allocated per connection.
    Snat,
    /// `external_ip[:external_port]` is forwarded to `logical_ip[:logical_port]`.
    Dnat,
    /// Floating IP: `external_ip` ⇄ `logical_ip`, 1:1 both ways.
    DnatAndSnat,
}

/// A NAT rule on a router. The external IP must be inside the subnet of one
/// of the router's switches: that switch is the router's external side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatRuleSpec {
    pub router: String,
    #[serde(rename = "type")]
    pub kind: NatKind,
    pub external_ip: String,
    /// SNAT: a CIDR; DNAT and floating IP: one address.
    pub logical_ip: String,
    /// DNAT port forwarding: `tcp` or `udp` (with both ports).
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub external_port: Option<u16>,
    #[serde(default)]
    pub logical_port: Option<u16>,
    /// SNAT source-port range (default 1024..=65535).
    #[serde(default)]
    pub port_min: Option<u16>,
    #[serde(default)]
    pub port_max: Option<u16>,
}

/// A router firewall rule, applied to traffic the router forwards.
/// Higher priority wins; traffic no rule matches is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRuleSpec {
    pub router: String,
    #[serde(default)]
    pub priority: u32,
    /// `tcp`, `udp` or `any` (default).
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub src_cidr: Option<String>,
    #[serde(default)]
    pub dst_cidr: Option<String>,
    /// Destination port range (TCP/UDP), inclusive.
    #[serde(default)]
    pub port_min: Option<u16>,
    #[serde(default)]
    pub port_max: Option<u16>,
    #[serde(default)]
    pub action: RuleAction,
}
