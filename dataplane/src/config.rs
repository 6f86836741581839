//! Validation of a [`DesiredState`], compilation into [`Tables`] and their
//! publication to the workers.
//!
//! `apply` either publishes a complete new generation or returns a precise
//! [`ConfigError`] and leaves the running tables untouched.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::fastmap::{self, mac_key};
use crate::lpm::{Lpm, Prefix};
use crate::model::DesiredState;
use crate::packet::headers::{is_group, parse_mac, Mac};
use crate::tables::{ingress_key, Gateway, Ingress, Lport, Route, Router, Switch, Tables};

/// Why a desired state was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("Switch {switch:?}: DHCP {problem}")]
    BadDhcp { switch: String, problem: String },
    #[error("Duplicate {kind} name {name:?}")]
    DuplicateName { kind: &'static str, name: String },
    #[error("Switch {switch:?}: bad subnet {value:?} (want a.b.c.d/len with host bits zero)")]
    BadSubnet { switch: String, value: String },
    #[error("Switch {switch:?}: VLAN {vlan} outside 1..=4094")]
    BadVlan { switch: String, vlan: u16 },
    #[error("{owner}: unknown switch {switch:?}")]
    UnknownSwitch { owner: String, switch: String },
    #[error("Port {port:?}: unknown interface {interface:?}")]
    UnknownInterface { port: String, interface: String },
    #[error("{owner}: bad MAC {value:?} (want a unicast aa:bb:cc:dd:ee:ff)")]
    BadMac { owner: String, value: String },
    #[error("{owner}: bad IPv4 address {value:?}")]
    BadIp { owner: String, value: String },
    #[error("{owner}: {ip} is outside subnet {subnet}")]
    IpOutsideSubnet {
        owner: String,
        ip: Ipv4Addr,
        subnet: Prefix,
    },
    #[error("MAC {mac} is bound twice on switch {switch:?}: {first:?} and {second:?}")]
    DuplicateMac {
        switch: String,
        mac: String,
        first: String,
        second: String,
    },
    #[error("IP {ip} is bound twice on switch {switch:?}: {first:?} and {second:?}")]
    DuplicateIp {
        switch: String,
        ip: std::net::IpAddr,
        first: String,
        second: String,
    },
    #[error("Port {port:?}: port security needs a bound MAC")]
    PortSecurityWithoutMac { port: String },
    #[error("Interface {interface:?} VLAN {vlan}: ports {first:?} and {second:?} cannot be told apart (both need bound MACs on one switch)")]
    AmbiguousIngress {
        interface: String,
        vlan: u16,
        first: String,
        second: String,
    },
    #[error("Router {router:?}: subnets {first} and {second} overlap")]
    OverlappingSubnets {
        router: String,
        first: Prefix,
        second: Prefix,
    },
    #[error("Switch {switch:?} is attached to routers {first:?} and {second:?}")]
    SwitchOnTwoRouters {
        switch: String,
        first: String,
        second: String,
    },
    #[error("Router {router:?}: bad route prefix {value:?}")]
    BadRoute { router: String, value: String },
    #[error("Router {router:?}: next hop {next_hop} of {prefix} is on no attached subnet")]
    UnreachableNextHop {
        router: String,
        prefix: Prefix,
        next_hop: Ipv4Addr,
    },
    #[error("{owner}: bad IPv6 prefix or address {value:?}")]
    BadIpv6 { owner: String, value: String },
    #[error("Router {router:?}: IPv6 subnets of {first:?} and {second:?} overlap")]
    OverlappingSubnets6 {
        router: String,
        first: String,
        second: String,
    },
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
    #[error(transparent)]
    Nat(#[from] crate::nat::NatError),
    #[error(transparent)]
    Qos(#[from] crate::qos::QosError),
    #[error(transparent)]
    Mirror(#[from] crate::mirror::MirrorError),
    #[error(transparent)]
    Nat64(#[from] crate::nat64::Nat64Error),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Lb4(#[from] crate::lb4::Lb4Error),
    #[error(transparent)]
    Overlay(#[from] crate::overlay::OverlayError),
    #[error("Too many {what}: {count} (limit {limit})")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
}

/// The largest number of data-plane interfaces (flood dedup uses a 64-bit mask).
pub const MAX_INTERFACES: usize = 64;

fn parse_unicast_mac(owner: &str, value: &str) -> Result<Mac, ConfigError> {
    parse_mac(value)
        .filter(|m| !is_group(m) && *m != [0; 6])
        .ok_or_else(|| ConfigError::BadMac {
            owner: owner.to_string(),
            value: value.to_string(),
        })
}

/// `addr/len` with host bits zero.
fn parse_prefix6(s: &str) -> Option<(u128, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr = u128::from(addr.parse::<std::net::Ipv6Addr>().ok()?);
    let len: u8 = len.parse().ok().filter(|l| *l <= 128)?;
    (addr & crate::tables::mask6(len) == addr).then_some((addr, len))
}

fn parse_ip(owner: &str, value: &str) -> Result<Ipv4Addr, ConfigError> {
    value.parse().map_err(|_| ConfigError::BadIp {
        owner: owner.to_string(),
        value: value.to_string(),
    })
}

fn unique<'a>(kind: &'static str, names: impl Iterator<Item = &'a str>) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(ConfigError::DuplicateName {
                kind,
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

/// Validates `desired` against the data plane's interfaces and compiles it.
pub fn compile(
    desired: &DesiredState,
    interfaces: &[String],
    generation: u64,
) -> Result<Tables, ConfigError> {
    if interfaces.len() > MAX_INTERFACES {
        return Err(ConfigError::TooMany {
            what: "interfaces",
            count: interfaces.len(),
            limit: MAX_INTERFACES,
        });
    }
    unique("switch", desired.switches.iter().map(|s| s.name.as_str()))?;
    unique("port", desired.ports.iter().map(|p| p.name.as_str()))?;
    unique("router", desired.routers.iter().map(|r| r.name.as_str()))?;
    if u32::try_from(desired.ports.len()).is_err() || u16::try_from(desired.switches.len()).is_err()
    {
        return Err(ConfigError::TooMany {
            what: "ports or switches",
            count: desired.ports.len(),
            limit: 65535,
        });
    }

    let mut switches = Vec::with_capacity(desired.switches.len());
    let mut switch_ids = HashMap::new();
    for (id, s) in desired.switches.iter().enumerate() {
        let subnet: Prefix = s.subnet.parse().map_err(|()| ConfigError::BadSubnet {
            switch: s.name.clone(),
            value: s.subnet.clone(),
        })?;
        let vlan = match s.vlan {
            None => 0,
            Some(v @ 1..=4094) => v,
            Some(v) => {
                return Err(ConfigError::BadVlan {
                    switch: s.name.clone(),
                    vlan: v,
                })
            }
        };
        switch_ids.insert(s.name.as_str(), u32::try_from(id).unwrap_or(u32::MAX));
        switches.push(Switch {
            name: s.name.clone(),
            subnet,
            vlan,
            members: Vec::new(),
            macs: fastmap::with_capacity(0),
            arp: fastmap::with_capacity(0),
            nd: fastmap::with_capacity(0),
            gateway: None,
            dhcp: None,
            vni: None,
            tunnel_lport: None,
            flood_endpoints: Vec::new(),
            subnet6: s
                .subnet6
                .as_deref()
                .map(|v| {
                    parse_prefix6(v).ok_or_else(|| ConfigError::BadIpv6 {
                        owner: format!("Switch {:?}", s.name),
                        value: v.to_string(),
                    })
                })
                .transpose()?,
        });
    }
    let switch_of = |owner: &str, name: &str| {
        switch_ids
            .get(name)
            .copied()
            .ok_or_else(|| ConfigError::UnknownSwitch {
                owner: owner.to_string(),
                switch: name.to_string(),
            })
    };

    // Who owns each bound MAC / IP per switch, for duplicate detection.
    let mut mac_owner: HashMap<(u32, Mac), String> = HashMap::new();
    let mut ip_owner: HashMap<(u32, Ipv4Addr), String> = HashMap::new();
    let mut claim_mac = |sw: u32, mac: Mac, owner: &str, switches: &[Switch]| {
        if let Some(first) = mac_owner.insert((sw, mac), owner.to_string()) {
            return Err(ConfigError::DuplicateMac {
                switch: switches
                    .get(sw as usize)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                mac: crate::packet::headers::mac_to_string(&mac),
                first,
                second: owner.to_string(),
            });
        }
        Ok(())
    };
    let mut claim_ip = |sw: u32, ip: Ipv4Addr, owner: &str, switches: &[Switch]| {
        if let Some(first) = ip_owner.insert((sw, ip), owner.to_string()) {
            return Err(ConfigError::DuplicateIp {
                switch: switches
                    .get(sw as usize)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                ip: ip.into(),
                first,
                second: owner.to_string(),
            });
        }
        Ok(())
    };

    let mut lports = Vec::with_capacity(desired.ports.len());
    for (id, p) in desired.ports.iter().enumerate() {
        let owner = format!("Port {:?}", p.name);
        let sw = switch_of(&owner, &p.switch)?;
        let port = interfaces
            .iter()
            .position(|i| *i == p.interface)
            .and_then(|i| u16::try_from(i).ok())
            .ok_or_else(|| ConfigError::UnknownInterface {
                port: p.name.clone(),
                interface: p.interface.clone(),
            })?;
        let mac = p
            .mac
            .as_deref()
            .map(|m| parse_unicast_mac(&owner, m))
            .transpose()?;
        if p.port_security && mac.is_none() {
            return Err(ConfigError::PortSecurityWithoutMac {
                port: p.name.clone(),
            });
        }
        let switch = switches
            .get_mut(sw as usize)
            .ok_or_else(|| ConfigError::UnknownSwitch {
                owner: owner.clone(),
                switch: p.switch.clone(),
            })?;
        let subnet = switch.subnet;
        let mut ips = Vec::with_capacity(p.ips.len());
        let mut ips6 = Vec::new();
        for ip in &p.ips {
            // IPv6 bindings feed the ND responder and port security; IPv6 is not routed.
            if let Ok(ip6) = ip.parse::<std::net::Ipv6Addr>() {
                ips6.push(ip6);
                continue;
            }
            let ip = parse_ip(&owner, ip)?;
            if !subnet.contains(ip) {
                return Err(ConfigError::IpOutsideSubnet { owner, ip, subnet });
            }
            ips.push(ip);
        }
        let id = u32::try_from(id).unwrap_or(u32::MAX);
        switch.members.push(id);
        lports.push(Lport {
            name: p.name.clone(),
            switch: sw,
            port,
            mac,
            ips,
            ips6,
            port_security: p.port_security,
            learning: mac.is_none(),
            remote: None,
            tunnel: false,
        });
    }
    let overlay = compile_overlay(desired, interfaces, &mut switches, &mut lports)?;
    let mut ip6_owner: HashMap<(u32, std::net::Ipv6Addr), String> = HashMap::new();
    for (id, lp) in lports.iter().enumerate() {
        let id = u32::try_from(id).unwrap_or(u32::MAX);
        if let Some(mac) = lp.mac {
            claim_mac(lp.switch, mac, &lp.name, &switches)?;
            if let Some(s) = switches.get_mut(lp.switch as usize) {
                s.macs.insert(mac_key(&mac), id);
            }
            for ip in &lp.ips {
                claim_ip(lp.switch, *ip, &lp.name, &switches)?;
                if let Some(s) = switches.get_mut(lp.switch as usize) {
                    s.arp.insert(u32::from(*ip), mac);
                }
            }
            for ip in &lp.ips6 {
                if let Some(s) = switches.get_mut(lp.switch as usize) {
                    if let Some(first) = ip6_owner.insert((lp.switch, *ip), lp.name.clone()) {
                        return Err(ConfigError::DuplicateIp {
                            switch: s.name.clone(),
                            ip: (*ip).into(),
                            first,
                            second: lp.name.clone(),
                        });
                    }
                    s.nd.insert(u128::from(*ip), mac);
                }
            }
        }
    }

    let ingress = build_ingress(&lports, &switches, interfaces)?;

    let mut routers = Vec::with_capacity(desired.routers.len());
    let mut attached_to: HashMap<u32, String> = HashMap::new();
    for (rid, r) in desired.routers.iter().enumerate() {
        let rid = u32::try_from(rid).unwrap_or(u32::MAX);
        let mut routes = Lpm::default();
        let mut own_ips = Vec::new();
        let mut own_ips6 = Vec::new();
        let mut routes6: Vec<crate::tables::Route6> = Vec::new();
        let mut attached: Vec<(u32, Prefix)> = Vec::new();
        for rp in &r.ports {
            let owner = format!("Router {:?} port on {:?}", r.name, rp.switch);
            let sw = switch_of(&owner, &rp.switch)?;
            if let Some(first) = attached_to.insert(sw, r.name.clone()) {
                return Err(ConfigError::SwitchOnTwoRouters {
                    switch: rp.switch.clone(),
                    first,
                    second: r.name.clone(),
                });
            }
            let mac = parse_unicast_mac(&owner, &rp.mac)?;
            let ip = parse_ip(&owner, &rp.ip)?;
            let Some(switch) = switches.get(sw as usize) else {
                return Err(ConfigError::UnknownSwitch {
                    owner,
                    switch: rp.switch.clone(),
                });
            };
            let subnet = switch.subnet;
            if !subnet.contains(ip) {
                return Err(ConfigError::IpOutsideSubnet { owner, ip, subnet });
            }
            if let Some((_, first)) = attached.iter().find(|(_, p)| p.overlaps(&subnet)) {
                return Err(ConfigError::OverlappingSubnets {
                    router: r.name.clone(),
                    first: *first,
                    second: subnet,
                });
            }
            claim_mac(sw, mac, &owner, &switches)?;
            claim_ip(sw, ip, &owner, &switches)?;
            attached.push((sw, subnet));
            own_ips.push(ip);
            routes.insert(
                subnet,
                vec![Route {
                    switch: sw,
                    next_hop: None,
                }],
            );
            if let Some(v) = &rp.ip6 {
                let bad = || ConfigError::BadIpv6 {
                    owner: owner.clone(),
                    value: v.clone(),
                };
                let ip6: std::net::Ipv6Addr = v.parse().map_err(|_| bad())?;
                let Some((prefix, len)) = switches.get(sw as usize).and_then(|s| s.subnet6) else {
                    return Err(bad());
                };
                if u128::from(ip6) & crate::tables::mask6(len) != prefix {
                    return Err(bad());
                }
                for other in &routes6 {
                    let l = len.min(other.len);
                    let m = crate::tables::mask6(l);
                    if prefix & m == other.prefix & m {
                        let name = |id: u32| {
                            switches
                                .get(id as usize)
                                .map(|s| s.name.clone())
                                .unwrap_or_default()
                        };
                        return Err(ConfigError::OverlappingSubnets6 {
                            router: r.name.clone(),
                            first: name(other.switch),
                            second: rp.switch.clone(),
                        });
                    }
                }
                if let Some(first) = ip6_owner.insert((sw, ip6), owner.clone()) {
                    return Err(ConfigError::DuplicateIp {
                        switch: rp.switch.clone(),
                        ip: ip6.into(),
                        first,
                        second: owner.clone(),
                    });
                }
                routes6.push(crate::tables::Route6 {
                    prefix,
                    len,
                    switch: sw,
                });
                own_ips6.push(ip6);
                if let Some(switch) = switches.get_mut(sw as usize) {
                    switch.nd.insert(u128::from(ip6), mac);
                }
            }
            if let Some(switch) = switches.get_mut(sw as usize) {
                switch.arp.insert(u32::from(ip), mac);
                switch.gateway = Some(Gateway {
                    router: rid,
                    mac,
                    ip,
                    ip6: rp.ip6.as_deref().and_then(|v| v.parse().ok()),
                });
            }
        }
        for sr in &r.static_routes {
            let prefix: Prefix = sr.prefix.parse().map_err(|()| ConfigError::BadRoute {
                router: r.name.clone(),
                value: sr.prefix.clone(),
            })?;
            let nh = parse_ip(
                &format!("Router {:?} route {}", r.name, sr.prefix),
                &sr.next_hop,
            )?;
            let Some((sw, _)) = attached.iter().find(|(_, p)| p.contains(nh)) else {
                return Err(ConfigError::UnreachableNextHop {
                    router: r.name.clone(),
                    prefix,
                    next_hop: nh,
                });
            };
            let hop = Route {
                switch: *sw,
                next_hop: Some(nh),
            };
            // Several static routes for one prefix form an ECMP group.
            match routes.get_mut(prefix) {
                Some(group) if group.iter().all(|h: &Route| h.next_hop.is_some()) => {
                    if !group.contains(&hop) {
                        group.push(hop);
                    }
                }
                _ => {
                    routes.insert(prefix, vec![hop]);
                }
            }
        }
        routers.push(Router {
            name: r.name.clone(),
            own_ips,
            own_ips6,
            routes6: {
                routes6.sort_by_key(|r| std::cmp::Reverse(r.len));
                routes6
            },
            routes,
        });
    }

    let stateful = compile_stateful(desired, &lports, &mut switches)?;
    // A load balancer's VIP is the router's own address: it answers echo
    // requests, and other traffic to it stops at the router.
    for lb in &desired.load_balancers {
        let (Some(r), Ok(vip)) = (
            desired
                .routers
                .iter()
                .position(|r| r.name == lb.router)
                .and_then(|i| routers.get_mut(i)),
            lb.vip.parse::<std::net::Ipv4Addr>(),
        ) else {
            continue;
        };
        if !r.own_ips.contains(&vip) {
            r.own_ips.push(vip);
        }
    }
    let router_names: Vec<&str> = desired.routers.iter().map(|r| r.name.as_str()).collect();
    let nat64 = crate::nat64::compile(&desired.nat64, &router_names, &mut switches)?;
    let views: Vec<crate::policy::RouterView<'_>> = desired
        .routers
        .iter()
        .enumerate()
        .map(|(rid, r)| crate::policy::RouterView {
            name: r.name.as_str(),
            attached: switches
                .iter()
                .enumerate()
                .filter_map(|(sid, sw)| {
                    let gw = sw.gateway.filter(|g| g.router as usize == rid)?;
                    Some((sw.name.as_str(), u32::try_from(sid).ok()?, sw.subnet, gw.ip))
                })
                .collect(),
        })
        .collect();
    let policies = crate::policy::compile(&desired.router_policies, &views)?;
    compile_dhcp(desired, &mut switches)?;
    let names: Vec<&str> = lports.iter().map(|l| l.name.as_str()).collect();
    let floating_ips: Vec<&str> = desired
        .nat
        .iter()
        .filter(|n| n.kind == crate::model::NatKind::DnatAndSnat)
        .map(|n| n.external_ip.as_str())
        .collect();
    let qos = crate::qos::compile(&desired.qos, &names, &floating_ips)?;
    // Remote and tunnel ports have no interface of their own to tap or mirror to.
    let taps: Vec<_> = lports
        .iter()
        .filter(|l| l.remote.is_none() && !l.tunnel)
        .map(|l| (l.name.as_str(), l.port, l.mac))
        .collect();
    let mirror = crate::mirror::compile(&desired.mirrors, &taps, interfaces)?;

    Ok(Tables {
        generation,
        interfaces: interfaces.to_vec(),
        ingress,
        lports,
        switches,
        routers,
        stateful,
        qos,
        mirror,
        nat64,
        policies,
        overlay,
    })
}

/// The overlay section: VNIs on switches, remote ports appended to the
/// logical ports (bound like local ones, so the responders and the router
/// know them) and one tunnel ingress port per overlay switch.
fn compile_overlay(
    desired: &DesiredState,
    interfaces: &[String],
    switches: &mut [Switch],
    lports: &mut Vec<Lport>,
) -> Result<Option<crate::overlay::OverlayTables>, ConfigError> {
    let Some(spec) = &desired.overlay else {
        return Ok(None);
    };
    let names: Vec<&str> = desired.switches.iter().map(|s| s.name.as_str()).collect();
    let local: Vec<(&str, &str)> = desired
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.interface.as_str()))
        .collect();
    let c = crate::overlay::compile(spec, &names, interfaces, &local)?;
    let mut seen = HashSet::new();
    for r in &c.remote_ports {
        if !seen.insert(r.name.as_str()) || desired.ports.iter().any(|p| p.name == r.name) {
            return Err(ConfigError::DuplicateName {
                kind: "port",
                name: r.name.clone(),
            });
        }
    }
    let too_many = || ConfigError::TooMany {
        what: "ports",
        count: desired.ports.len() + spec.remote_ports.len(),
        limit: u32::MAX as usize,
    };
    for r in c.remote_ports {
        let owner = format!("Remote port {:?}", r.name);
        let Some(sw) = switches.get_mut(r.switch as usize) else {
            continue;
        };
        for ip in &r.ips {
            if !sw.subnet.contains(*ip) {
                return Err(ConfigError::IpOutsideSubnet {
                    owner,
                    ip: *ip,
                    subnet: sw.subnet,
                });
            }
        }
        let id = u32::try_from(lports.len()).map_err(|_| too_many())?;
        sw.members.push(id);
        if !sw.flood_endpoints.contains(&r.endpoint) {
            sw.flood_endpoints.push(r.endpoint);
        }
        lports.push(Lport {
            name: r.name,
            switch: r.switch,
            port: c.tables.port,
            mac: Some(r.mac),
            ips: r.ips,
            ips6: r.ips6,
            port_security: false,
            learning: false,
            remote: Some(r.endpoint),
            tunnel: false,
        });
    }
    for (id, (sw, vni)) in switches.iter_mut().zip(c.vnis).enumerate() {
        let Some(vni) = vni else { continue };
        sw.vni = Some(vni);
        sw.tunnel_lport = Some(u32::try_from(lports.len()).map_err(|_| too_many())?);
        lports.push(Lport {
            name: format!("tunnel:{}", sw.name),
            switch: u32::try_from(id).map_err(|_| too_many())?,
            port: c.tables.port,
            mac: None,
            ips: Vec::new(),
            ips6: Vec::new(),
            port_security: false,
            learning: false,
            remote: None,
            tunnel: true,
        });
    }
    Ok(Some(c.tables))
}

/// Security groups, NAT and firewall (their own modules; one call here).
fn compile_stateful(
    desired: &DesiredState,
    lports: &[Lport],
    switches: &mut [Switch],
) -> Result<crate::stateful::StatefulTables, ConfigError> {
    let mut names = Vec::new();
    let acls = crate::security::compile(desired, lports, &mut names)?;
    let mut routers = crate::nat::compile(desired, switches, &mut names)?;
    let router_names: Vec<&str> = desired.routers.iter().map(|r| r.name.as_str()).collect();
    let lb = crate::lb4::compile(
        &desired.load_balancers,
        &router_names,
        switches,
        &mut routers,
    )?;
    let hits = names
        .iter()
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    Ok(crate::stateful::StatefulTables {
        acls,
        routers,
        lb,
        counters: crate::security::RuleCounters {
            names: names.into(),
            hits,
        },
    })
}

fn build_ingress(
    lports: &[Lport],
    switches: &[Switch],
    interfaces: &[String],
) -> Result<fastmap::FastMap<u32, Ingress>, ConfigError> {
    let mut groups: HashMap<u32, Vec<u32>> = HashMap::new();
    for (id, lp) in lports.iter().enumerate() {
        // Remote and tunnel ports are reached through the underlay, not by ingress lookup.
        if lp.remote.is_some() || lp.tunnel {
            continue;
        }
        let vlan = switches.get(lp.switch as usize).map_or(0, |s| s.vlan);
        groups
            .entry(ingress_key(lp.port, vlan))
            .or_default()
            .push(u32::try_from(id).unwrap_or(u32::MAX));
    }
    let mut ingress = fastmap::with_capacity(groups.len());
    for (key, ids) in groups {
        let entry = match ids.as_slice() {
            [one] => Ingress::One(*one),
            _ => {
                let mut by_mac = fastmap::with_capacity(ids.len());
                let first = ids.first().and_then(|i| lports.get(*i as usize));
                for id in &ids {
                    let lp = lports.get(*id as usize);
                    match (first, lp) {
                        (Some(f), Some(lp))
                            if lp.mac.is_some() && f.switch == lp.switch && f.mac.is_some() =>
                        {
                            if let Some(mac) = lp.mac {
                                by_mac.insert(mac_key(&mac), *id);
                            }
                        }
                        (Some(f), Some(lp)) => {
                            let port = usize::from(u16::try_from(key >> 16).unwrap_or(0));
                            return Err(ConfigError::AmbiguousIngress {
                                interface: interfaces.get(port).cloned().unwrap_or_default(),
                                vlan: u16::try_from(key & 0xfff).unwrap_or(0),
                                first: f.name.clone(),
                                second: lp.name.clone(),
                            });
                        }
                        _ => {}
                    }
                }
                Ingress::BySourceMac(by_mac)
            }
        };
        ingress.insert(key, entry);
    }
    Ok(ingress)
}

/// The published tables plus the desired state they came from.
///
/// Cloned handles share state. `apply` serialises writers with a mutex (the
/// control path); readers only do a lock-free `ArcSwap` load.
#[derive(Clone)]
pub struct ConfigHandle {
    tables: Arc<ArcSwap<Tables>>,
    desired: Arc<Mutex<DesiredState>>,
    interfaces: Arc<Vec<String>>,
}

impl ConfigHandle {
    /// A handle for a data plane with these interfaces, forwarding nothing yet.
    pub fn new(interfaces: Vec<String>) -> ConfigHandle {
        let tables = Tables {
            interfaces: interfaces.clone(),
            ..Tables::default()
        };
        ConfigHandle {
            tables: Arc::new(ArcSwap::from_pointee(tables)),
            desired: Arc::new(Mutex::new(DesiredState::default())),
            interfaces: Arc::new(interfaces),
        }
    }

    /// Validates and publishes `desired`; returns the new generation. On error
    /// the running tables stay as they are.
    pub fn apply(&self, desired: DesiredState) -> Result<u64, ConfigError> {
        let mut current = self.desired.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.tables.load().generation + 1;
        let mut tables = compile(&desired, &self.interfaces, generation)?;
        let running = self.tables.load();
        tables.qos.link(&running.qos, running.generation);
        self.tables.store(Arc::new(tables));
        *current = desired;
        Ok(generation)
    }

    /// The desired state last applied.
    pub fn desired(&self) -> DesiredState {
        self.desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The shared pointer workers load from.
    pub fn tables(&self) -> Arc<ArcSwap<Tables>> {
        Arc::clone(&self.tables)
    }

    /// The data plane's interface names.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }
}

/// DHCP settings per switch; runs after the routers so gateways are known.
fn compile_dhcp(desired: &DesiredState, switches: &mut [Switch]) -> Result<(), ConfigError> {
    for (spec, switch) in desired.switches.iter().zip(switches.iter_mut()) {
        let Some(d) = &spec.dhcp else { continue };
        let bad = |problem: String| ConfigError::BadDhcp {
            switch: spec.name.clone(),
            problem,
        };
        if d.dns_servers.len() > crate::dhcp::MAX_DNS {
            return Err(bad(format!(
                "has {} DNS servers (at most {})",
                d.dns_servers.len(),
                crate::dhcp::MAX_DNS
            )));
        }
        let dns = d
            .dns_servers
            .iter()
            .map(|v| parse_ip(&format!("Switch {:?} DNS server", spec.name), v))
            .collect::<Result<Vec<_>, _>>()?;
        if d.lease_secs < 60 {
            return Err(bad(format!("lease {} s is below 60 s", d.lease_secs)));
        }
        if let Some(mtu) = d.mtu.filter(|m| !(576..=9000).contains(m)) {
            return Err(bad(format!("MTU {mtu} outside 576..=9000")));
        }
        let (server_ip, server_mac) = match (switch.gateway, &d.server_ip) {
            (Some(g), None) => (g.ip, g.mac),
            (_, Some(ip)) => {
                let ip = parse_ip(&format!("Switch {:?} DHCP server", spec.name), ip)?;
                if !switch.subnet.contains(ip) {
                    return Err(bad(format!("server address {ip} outside the subnet")));
                }
                let mac = switch.gateway.map_or(DHCP_SERVER_MAC, |g| g.mac);
                (ip, mac)
            }
            (None, None) => {
                return Err(bad(
                    "needs a router attached or a server_ip for the server identifier".into(),
                ))
            }
        };
        switch.dhcp = Some(crate::dhcp::DhcpConfig {
            lease_secs: d.lease_secs,
            mtu: d.mtu,
            dns,
            server_ip,
            server_mac,
        });
    }
    Ok(())
}

/// Source MAC of DHCP replies on a switch without a router (locally administered).
const DHCP_SERVER_MAC: Mac = [0x02, 0x6b, 0x65, 0x65, 0x6c, 0x01];
