//! The compiled, immutable forwarding tables a worker reads.
//!
//! Built once per configuration change by [`crate::config`], never mutated
//! afterwards, and published with an RCU-style pointer swap: a worker loads the
//! current `Arc<Tables>` once per batch and keeps forwarding on it while a new
//! one is being compiled.

use std::net::Ipv4Addr;

use crate::fastmap::FastMap;
use crate::lpm::{Lpm, Prefix};
use crate::packet::headers::Mac;

/// Index into [`Tables::lports`].
pub type LportId = u32;
/// Index into [`Tables::switches`].
pub type SwitchId = u32;

/// Packs an ingress (interface index, VLAN) pair; VLAN 0 = untagged.
pub fn ingress_key(port: u16, vlan: u16) -> u32 {
    (u32::from(port) << 16) | u32::from(vlan)
}

/// Which logical port a frame arriving on (interface, VLAN) belongs to.
#[derive(Debug, Clone)]
pub enum Ingress {
    /// The common case: one logical port per interface and VLAN.
    One(LportId),
    /// Several bound ports share the interface; the source MAC picks one.
    BySourceMac(FastMap<u64, LportId>),
}

/// A compiled logical port.
#[derive(Debug, Clone)]
pub struct Lport {
    pub name: String,
    pub switch: SwitchId,
    /// Data-plane interface index.
    pub port: u16,
    pub mac: Option<Mac>,
    pub ips: Vec<Ipv4Addr>,
    /// Bound IPv6 addresses (ND responder, port security).
    pub ips6: Vec<std::net::Ipv6Addr>,
    pub port_security: bool,
    /// MACs seen from this port are learned (it has no bound MAC).
    pub learning: bool,
    /// A remote port: the index of the overlay endpoint holding it
    /// (`port` is then the underlay interface).
    pub remote: Option<u16>,
    /// The ingress of frames decapsulated for this port's switch (one
    /// per overlay switch, not a flood member).
    pub tunnel: bool,
}

/// Where a switch meets its router.
#[derive(Debug, Clone, Copy)]
pub struct Gateway {
    pub router: u32,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// The gateway's IPv6 address, when it has one (ICMPv6 errors).
    pub ip6: Option<std::net::Ipv6Addr>,
}

/// A compiled logical switch.
#[derive(Debug, Clone)]
pub struct Switch {
    pub name: String,
    pub subnet: Prefix,
    /// 802.1Q VLAN ID, 0 for untagged.
    pub vlan: u16,
    /// Every logical port, in configuration order (the flood list).
    pub members: Vec<LportId>,
    /// Bound MAC → port.
    pub macs: FastMap<u64, LportId>,
    /// Bound IP → MAC: the ARP responder's answers and the router's neighbors.
    pub arp: FastMap<u32, Mac>,
    /// Bound IPv6 → MAC: the ND responder's answers.
    pub nd: FastMap<u128, Mac>,
    pub gateway: Option<Gateway>,
    /// IPv6 prefix as (address bits, length).
    pub subnet6: Option<(u128, u8)>,
    /// DHCPv4 server settings, when the switch serves DHCP.
    pub dhcp: Option<crate::dhcp::DhcpConfig>,
    /// The switch's VNI when it spans hosts ([`crate::overlay`]).
    pub vni: Option<u32>,
    /// Its tunnel ingress port (decapsulated frames come from it).
    pub tunnel_lport: Option<LportId>,
    /// Endpoints holding ports of the switch: head-end replication of floods.
    pub flood_endpoints: Vec<u16>,
}

/// One next hop of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Outgoing switch.
    pub switch: SwitchId,
    /// Gateway to forward to; `None` = the destination is on that switch.
    pub next_hop: Option<Ipv4Addr>,
}

/// A connected IPv6 route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route6 {
    pub prefix: u128,
    pub len: u8,
    pub switch: SwitchId,
}

/// The network mask of an IPv6 prefix length (0..=128).
pub fn mask6(len: u8) -> u128 {
    match len {
        0 => 0,
        1..=128 => u128::MAX << (128 - u32::from(len)),
        _ => u128::MAX,
    }
}

/// A compiled logical router.
#[derive(Debug, Clone)]
pub struct Router {
    pub name: String,
    /// Gateway addresses the router owns (answers pings to).
    pub own_ips: Vec<Ipv4Addr>,
    /// Gateway IPv6 addresses the router owns.
    pub own_ips6: Vec<std::net::Ipv6Addr>,
    /// Attached IPv6 subnets (connected routes), longest prefix first.
    pub routes6: Vec<Route6>,
    /// Prefix → next hops; more than one is an ECMP group, picked per flow.
    pub routes: Lpm<Vec<Route>>,
}

/// One immutable generation of forwarding state.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    /// Increases with every successful apply; workers flush learned state when it changes.
    pub generation: u64,
    /// Data-plane interface names, by index.
    pub interfaces: Vec<String>,
    pub ingress: FastMap<u32, Ingress>,
    pub lports: Vec<Lport>,
    pub switches: Vec<Switch>,
    pub routers: Vec<Router>,
    /// Security groups, NAT and firewall ([`crate::stateful`]).
    pub stateful: crate::stateful::StatefulTables,
    /// Meters and DSCP marking ([`crate::qos`]).
    pub qos: crate::qos::QosTables,
    /// Mirror sessions ([`crate::mirror`]); applied by the engine.
    pub mirror: crate::mirror::MirrorTables,
    /// NAT64 per router (indexed like `routers`).
    pub nat64: Vec<Option<crate::nat64::Nat64>>,
    /// Router policies ([`crate::policy`]).
    pub policies: crate::policy::PolicyTables,
    /// Tunnels to other hosts ([`crate::overlay`]).
    pub overlay: Option<crate::overlay::OverlayTables>,
}

impl Tables {
    /// Interface index by name (control path).
    pub fn interface_index(&self, name: &str) -> Option<u16> {
        self.interfaces
            .iter()
            .position(|i| i == name)
            .and_then(|i| u16::try_from(i).ok())
    }
}
