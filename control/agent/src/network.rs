//! VM NICs on VPC subnets: the agent compiles the store's ports, subnets
//! and routers into the data plane's one declarative input
//! ([`keel_dataplane::model::DesiredState`]) and runs `keel dataplane` with
//! a vhost-user-net socket per NIC port. Subnets become switches (with
//! keel's DHCP when the subnet enables it), router interfaces their
//! gateways, ports the bound MAC/IP of a VM NIC. A router with an external
//! gateway gets a leg on its external network's switch, whose one port is
//! this host's uplink interface for the network's physical network (`keel
//! up --uplink NAME=IFACE`), a default route to the network's gateway,
//! SNAT for its subnets and the 1:1 NAT of its floating IPs.
//!
//! A change that keeps the set of NIC ports (rules, routers, DHCP) is
//! applied in place over the data plane's control socket: the tables swap
//! atomically and connections survive. The port set is fixed when the data
//! plane starts, so adding or removing a NIC restarts it; QEMU's vhost-user
//! reconnect brings running VMs' NICs back within a second.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_control::api::address_groups::AddressGroupSpec;
use keel_control::api::external_networks::ExternalNetworkSpec;
use keel_control::api::floating_ips::FloatingIpSpec;
use keel_control::api::loadbalancers::LoadBalancerSpec as ApiLoadBalancer;
use keel_control::api::mirror_sessions::{self as api_mirror, MirrorSessionSpec};
use keel_control::api::networks::SubnetSpec;
use keel_control::api::port_sets::PortSetSpec;
use keel_control::api::ports::PortSpec as ApiPort;
use keel_control::api::qos_policies::{BandwidthLimit, QosPolicySpec};
use keel_control::api::records::Record;
use keel_control::api::router_rules::{
    FirewallAction, FirewallProtocol, FirewallRule, PolicyAction as ApiPolicyAction, RouterPolicy,
};
use keel_control::api::routers::RouterSpec as ApiRouter;
use keel_control::api::security_groups::{self as api_sg, SgSpec};
use keel_dataplane::lb4::{LbMemberStats, MemberHealth};
use keel_dataplane::model::FirewallRuleSpec;
use keel_dataplane::model::{
    DesiredState, DhcpSpec, EtherType, NatKind, NatRuleSpec, PortSpec, RouterPortSpec, RouterSpec,
    RuleAction, RuleDirection, SecurityGroupSpec, SecurityRuleSpec, StaticRouteSpec, SwitchSpec,
};
use keel_dataplane::policy::{PolicyAction, RouterPolicySpec};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Cannot start the data plane")]
    Spawn(#[source] std::io::Error),
    #[error("The data plane exited at start ({status}): {log}")]
    Exited { status: String, log: String },
    #[error("Cannot write the data plane's desired state {path}")]
    WriteState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const START_WAIT: Duration = Duration::from_secs(10);

/// The vhost-user-net socket of a NIC port.
pub fn nic_socket(run_dir: &Path, port_id: &str) -> PathBuf {
    run_dir.join(format!("{port_id}.net.sock"))
}

/// A stable, locally administered MAC for a router's gateway on a subnet.
fn gateway_mac(router: &str, subnet: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (router, subnet).hash(&mut h);
    let b = h.finish().to_le_bytes();
    format!("fa:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// An API rule as data-plane rules: a rule without a remote CIDR covers
/// both address families, except an ICMP rule with a type (ICMPv4 numbers).
fn rules_of(rule: &api_sg::Rule) -> Vec<SecurityRuleSpec> {
    let families: &[EtherType] = match rule.remote_cidr.as_deref() {
        Some(c) if c.contains(':') => &[EtherType::Ipv6],
        Some(_) => &[EtherType::Ipv4],
        None if rule.icmp_type.is_some() => &[EtherType::Ipv4],
        None => &[EtherType::Ipv4, EtherType::Ipv6],
    };
    families
        .iter()
        .map(|&ethertype| SecurityRuleSpec {
            direction: match rule.direction {
                api_sg::Direction::Ingress => RuleDirection::Ingress,
                api_sg::Direction::Egress => RuleDirection::Egress,
            },
            ethertype,
            protocol: match rule.protocol {
                api_sg::Protocol::Any => None,
                api_sg::Protocol::Tcp => Some("tcp".into()),
                api_sg::Protocol::Udp => Some("udp".into()),
                api_sg::Protocol::Icmp if ethertype == EtherType::Ipv6 => Some("icmpv6".into()),
                api_sg::Protocol::Icmp => Some("icmp".into()),
            },
            port_min: rule.port_range_min,
            port_max: rule.port_range_max,
            icmp_type: rule.icmp_type,
            icmp_code: rule.icmp_code,
            remote_cidr: rule.remote_cidr.clone(),
            remote_group: rule.remote_group_id.clone(),
            remote_address_group: rule.remote_address_group_id.clone(),
            port_set: rule.port_set_id.clone(),
            priority: rule.priority,
            action: match rule.action {
                api_sg::RuleAction::Allow => RuleAction::Allow,
                api_sg::RuleAction::Deny => RuleAction::Deny,
            },
        })
        .collect()
}

/// The store's network resources an agent compiles (ids to records).
pub struct NetworkView<'a> {
    /// VMs of this host with NICs, and their port ids.
    pub vms: &'a [(Record, Vec<String>)],
    pub ports: &'a BTreeMap<String, Record>,
    pub subnets: &'a BTreeMap<String, Record>,
    pub routers: &'a [Record],
    pub groups: &'a BTreeMap<String, Record>,
    /// Address groups and port sets security-group rules may name.
    pub address_groups: &'a BTreeMap<String, Record>,
    pub port_sets: &'a BTreeMap<String, Record>,
    pub external_networks: &'a BTreeMap<String, Record>,
    pub floating_ips: &'a [Record],
    pub qos_policies: &'a BTreeMap<String, Record>,
    pub mirror_sessions: &'a [Record],
    /// Load balancers with a VIP on a VPC subnet.
    pub load_balancers: &'a [Record],
    /// This host's uplink interface per physical network.
    pub uplinks: &'a BTreeMap<String, String>,
}

/// The data plane's QoS entry for `policy_id` on a port (or, with
/// `floating_ip`, on that address): `None` when the policy is gone.
fn qos_of(
    policies: &BTreeMap<String, Record>,
    policy_id: &str,
    port: Option<String>,
    floating_ip: Option<String>,
) -> Option<keel_dataplane::qos::QosSpec> {
    let spec: QosPolicySpec = policies.get(policy_id)?.spec().ok()?;
    let meter = |l: Option<BandwidthLimit>| {
        l.map(|l| keel_dataplane::qos::MeterSpec {
            rate_kbps: l.max_kbps,
            burst_bytes: l.max_burst_kbits.unwrap_or(l.max_kbps) * 125,
        })
    };
    Some(keel_dataplane::qos::QosSpec {
        dscp: if floating_ip.is_some() {
            None
        } else {
            spec.dscp_mark
        },
        port,
        floating_ip,
        ingress: meter(spec.ingress),
        egress: meter(spec.egress),
    })
}

fn firewall_rule(router: &str, r: &FirewallRule) -> FirewallRuleSpec {
    FirewallRuleSpec {
        router: router.to_owned(),
        priority: r.priority,
        protocol: Some(
            match r.protocol {
                FirewallProtocol::Any => "any",
                FirewallProtocol::Tcp => "tcp",
                FirewallProtocol::Udp => "udp",
            }
            .to_owned(),
        ),
        src_cidr: r.src_cidr.clone(),
        dst_cidr: r.dst_cidr.clone(),
        port_min: r.port_range_min,
        port_max: r.port_range_max,
        action: match r.action {
            FirewallAction::Allow => RuleAction::Allow,
            FirewallAction::Deny => RuleAction::Deny,
        },
    }
}

fn router_policy(router: &str, p: &RouterPolicy) -> RouterPolicySpec {
    RouterPolicySpec {
        router: router.to_owned(),
        priority: p.priority,
        from_switch: p.from_subnet_id.clone(),
        src_cidr: p.src_cidr.clone(),
        dst_cidr: p.dst_cidr.clone(),
        protocol: p.protocol.clone(),
        action: match p.action {
            ApiPolicyAction::Allow => PolicyAction::Allow,
            ApiPolicyAction::Drop => PolicyAction::Drop,
            ApiPolicyAction::Reroute => PolicyAction::Reroute,
        },
        next_hop: p.nexthop.map(|h| h.to_string()),
    }
}

/// The name of the data-plane port on an uplink interface.
fn uplink_port(interface: &str) -> String {
    format!("uplink-{interface}")
}

/// A NAT rule of `router` without ports.
fn nat(router: &str, kind: NatKind, external_ip: String, logical_ip: String) -> NatRuleSpec {
    NatRuleSpec {
        router: router.to_owned(),
        kind,
        external_ip,
        logical_ip,
        protocol: None,
        external_port: None,
        logical_port: None,
        port_min: None,
        port_max: None,
    }
}

/// Compiles the desired state from the NIC ports of `view.vms`, and the
/// subnets, routers, security groups, external networks and floating IPs
/// those ports use. Non-IPv4 subnets are left out (the data plane routes
/// IPv4); an external network whose physical network has no uplink on this
/// host is left out too (its routers then route only inside the VPC).
pub fn desired_state(view: &NetworkView<'_>) -> DesiredState {
    let mut state = DesiredState::default();
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, port_ids) in view.vms {
        for pid in port_ids {
            let Some(port) = view.ports.get(pid) else {
                continue;
            };
            let Ok(spec) = port.spec::<ApiPort>() else {
                continue;
            };
            if !spec.fixed_ip.is_ipv4() {
                continue;
            }
            used.insert(spec.subnet_id.clone());
            for g in &spec.security_group_ids {
                members.entry(g.clone()).or_default().push(pid.clone());
            }
            if let Some(q) = spec
                .qos_policy_id
                .as_deref()
                .and_then(|q| qos_of(view.qos_policies, q, Some(pid.clone()), None))
            {
                state.qos.push(q);
            }
            state.ports.push(PortSpec {
                name: pid.clone(),
                switch: spec.subnet_id.clone(),
                interface: pid.clone(),
                mac: Some(spec.mac_address.clone()),
                ips: vec![spec.fixed_ip.to_string()],
                port_security: true,
            });
        }
    }
    let balanced = balanced_here(view, &mut used);
    // VIP ports the data plane balances here: a floating IP may target them.
    let vip_ports: BTreeSet<String> = balanced
        .iter()
        .filter_map(|(_, lb)| lb.vip_port_id.clone())
        .collect();
    let mut gateways: BTreeMap<String, bool> = BTreeMap::new();
    // External network → the uplink interface its switch is plugged into.
    let mut plugged: BTreeMap<String, String> = BTreeMap::new();
    for router in view.routers {
        let Ok(spec) = router.spec::<ApiRouter>() else {
            continue;
        };
        let rid = router.meta.id.as_str();
        let mut ports: Vec<RouterPortSpec> = spec
            .interfaces
            .iter()
            .filter(|i| used.contains(&i.subnet_id) && i.ip_address.is_ipv4())
            .map(|i| {
                gateways.insert(i.subnet_id.clone(), true);
                RouterPortSpec {
                    switch: i.subnet_id.clone(),
                    mac: gateway_mac(rid, &i.subnet_id),
                    ip: i.ip_address.to_string(),
                    ip6: None,
                }
            })
            .collect();
        if ports.is_empty() {
            continue;
        }
        let inside: Vec<String> = ports.iter().map(|p| p.switch.clone()).collect();
        // Networks a next hop may be on: the data plane refuses others.
        let mut connected: Vec<ipnet::IpNet> = inside
            .iter()
            .filter_map(|s| view.subnets.get(s)?.spec::<SubnetSpec>().ok())
            .map(|s| s.cidr)
            .collect();
        let mut static_routes: Vec<StaticRouteSpec> = Vec::new();
        if let Some(gw) = &spec.external_gateway {
            let external = view
                .external_networks
                .get(&gw.external_network_id)
                .and_then(|r| r.spec::<ExternalNetworkSpec>().ok());
            let interface = external
                .as_ref()
                .and_then(|e| view.uplinks.get(&e.physical_network));
            if let (Some(ext), Some(interface)) = (external, interface) {
                let net_id = gw.external_network_id.clone();
                let free = plugged.get(&net_id).is_some_and(|i| i == interface)
                    || !plugged.values().any(|i| i == interface);
                if free {
                    if !plugged.contains_key(&net_id) {
                        plugged.insert(net_id.clone(), interface.clone());
                        state.switches.push(SwitchSpec {
                            name: net_id.clone(),
                            subnet: ext.cidr.trunc().to_string(),
                            vlan: None,
                            subnet6: None,
                            dhcp: None,
                        });
                        state.ports.push(PortSpec {
                            name: uplink_port(interface),
                            switch: net_id.clone(),
                            interface: interface.clone(),
                            mac: None,
                            ips: Vec::new(),
                            port_security: false,
                        });
                    }
                    connected.push(ext.cidr);
                    ports.push(RouterPortSpec {
                        switch: net_id.clone(),
                        mac: gateway_mac(rid, &net_id),
                        ip: gw.external_ip.to_string(),
                        ip6: None,
                    });
                    if let Some(next_hop) = ext.gateway_ip {
                        static_routes.push(StaticRouteSpec {
                            prefix: "0.0.0.0/0".into(),
                            next_hop: next_hop.to_string(),
                        });
                    }
                    if gw.enable_snat {
                        for subnet in &inside {
                            let Some(cidr) = view
                                .subnets
                                .get(subnet)
                                .and_then(|s| s.spec::<SubnetSpec>().ok())
                            else {
                                continue;
                            };
                            state.nat.push(nat(
                                rid,
                                NatKind::Snat,
                                gw.external_ip.to_string(),
                                cidr.cidr.trunc().to_string(),
                            ));
                        }
                    }
                    for fip in view.floating_ips {
                        let Ok(f) = fip.spec::<FloatingIpSpec>() else {
                            continue;
                        };
                        if f.router_id.as_deref() != Some(rid) || f.external_network_id != net_id {
                            continue;
                        }
                        let here = |p: &String| {
                            vip_ports.contains(p) || state.ports.iter().any(|sp| &sp.name == p)
                        };
                        let address = f.floating_ip_address.to_string();
                        let mut rules: Vec<NatRuleSpec> = Vec::new();
                        if let (Some(true), Some(fixed)) =
                            (f.port_id.as_ref().map(here), f.fixed_ip_address)
                        {
                            rules.push(nat(
                                rid,
                                NatKind::DnatAndSnat,
                                address.clone(),
                                fixed.to_string(),
                            ));
                        }
                        for pf in f
                            .port_forwardings
                            .iter()
                            .filter(|pf| here(&pf.internal_port_id))
                        {
                            rules.push(NatRuleSpec {
                                protocol: Some(pf.protocol.as_str().to_owned()),
                                external_port: Some(pf.external_port),
                                logical_port: Some(pf.internal_port),
                                ..nat(
                                    rid,
                                    NatKind::Dnat,
                                    address.clone(),
                                    pf.internal_ip_address.to_string(),
                                )
                            });
                        }
                        // QoS meters 1:1 floating IPs only (the API refuses
                        // it on forwardings; the data plane keys meters on
                        // dnat_and_snat addresses).
                        let one_to_one = rules.iter().any(|r| r.kind == NatKind::DnatAndSnat);
                        if let Some(q) = f
                            .qos_policy_id
                            .as_deref()
                            .filter(|_| one_to_one)
                            .and_then(|q| qos_of(view.qos_policies, q, None, Some(address.clone())))
                        {
                            state.qos.push(q);
                        }
                        state.nat.extend(rules);
                    }
                } else {
                    tracing::warn!(router = rid, network = %net_id, %interface,
                        "uplink already carries another external network; gateway left out");
                }
            }
        }
        // The user's routes replace the default one for the same prefix.
        for route in &spec.routes {
            if route.nexthop.is_ipv4() && connected.iter().any(|c| c.contains(&route.nexthop)) {
                static_routes.retain(|r| r.prefix != route.destination);
                static_routes.push(StaticRouteSpec {
                    prefix: route.destination.clone(),
                    next_hop: route.nexthop.to_string(),
                });
            }
        }
        for rule in &spec.firewall_rules {
            state.firewall.push(firewall_rule(rid, rule));
        }
        // A policy on a subnet, or to a next hop, not routed here is left
        // out (the data plane refuses those).
        for p in &spec.policies {
            let from_here = p
                .from_subnet_id
                .as_ref()
                .is_none_or(|s| ports.iter().any(|rp| &rp.switch == s));
            let hop_here = p
                .nexthop
                .is_none_or(|h| connected.iter().any(|c| c.contains(&h)));
            if from_here && hop_here {
                state.router_policies.push(router_policy(rid, p));
            }
        }
        state.routers.push(RouterSpec {
            name: rid.to_owned(),
            ports,
            static_routes,
        });
    }
    for (rid, lb) in balanced {
        if !state.routers.iter().any(|r| r.name == rid) {
            continue;
        }
        match keel_lb::l4::compile(&lb.config, &rid) {
            Ok(specs) => state.load_balancers.extend(specs),
            // The API checked it with the same code: only a document
            // stored by an older keel can fail here.
            Err(e) => tracing::warn!(lb = %lb.config.id, error = %e, "load balancer left out"),
        }
    }
    // Groups of this host's ports, and the groups their rules name as
    // remote (whose members here give the addresses; members on other
    // hosts are not known to this data plane).
    let address_groups: BTreeMap<&str, AddressGroupSpec> = view
        .address_groups
        .iter()
        .filter_map(|(id, r)| Some((id.as_str(), r.spec().ok()?)))
        .collect();
    let port_sets: BTreeMap<&str, PortSetSpec> = view
        .port_sets
        .iter()
        .filter_map(|(id, r)| Some((id.as_str(), r.spec().ok()?)))
        .collect();
    let mut wanted: Vec<String> = members.keys().cloned().collect();
    let mut i = 0;
    while let Some(group) = wanted.get(i).cloned() {
        i += 1;
        let Some(spec) = view
            .groups
            .get(&group)
            .and_then(|r| r.spec::<SgSpec>().ok())
        else {
            continue;
        };
        for remote in spec.rules.iter().filter_map(|r| r.remote_group_id.as_ref()) {
            if view.groups.contains_key(remote) && !wanted.contains(remote) {
                wanted.push(remote.clone());
            }
        }
        state.security_groups.push(SecurityGroupSpec {
            ports: members.get(&group).cloned().unwrap_or_default(),
            name: group,
            // A rule naming a group or set that is gone (the API prevents
            // it) would make the data plane refuse the whole state.
            rules: spec
                .rules
                .iter()
                .filter(|r| {
                    r.remote_group_id
                        .as_ref()
                        .is_none_or(|g| view.groups.contains_key(g))
                        && r.remote_address_group_id
                            .as_ref()
                            .is_none_or(|g| address_groups.contains_key(g.as_str()))
                        && r.port_set_id
                            .as_ref()
                            .is_none_or(|p| port_sets.contains_key(p.as_str()))
                })
                .flat_map(rules_of)
                .collect(),
        });
    }
    // The address groups and port sets those rules name, by id: a change of
    // one reaches the data plane with the next reconcile, like a rule edit.
    let named: BTreeSet<&str> = state
        .security_groups
        .iter()
        .flat_map(|g| &g.rules)
        .filter_map(|r| r.remote_address_group.as_deref())
        .collect();
    state.address_groups = named
        .into_iter()
        .filter_map(|id| {
            Some(keel_dataplane::model::AddressGroupSpec {
                name: id.to_owned(),
                addresses: address_groups
                    .get(id)?
                    .addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            })
        })
        .collect();
    let named: BTreeSet<&str> = state
        .security_groups
        .iter()
        .flat_map(|g| &g.rules)
        .filter_map(|r| r.port_set.as_deref())
        .collect();
    state.port_sets = named
        .into_iter()
        .filter_map(|id| {
            Some(keel_dataplane::model::PortSetSpec {
                name: id.to_owned(),
                ports: port_sets
                    .get(id)?
                    .ports
                    .iter()
                    .map(|r| keel_dataplane::model::PortRangeSpec {
                        min: r.min,
                        max: r.max,
                    })
                    .collect(),
            })
        })
        .collect();
    // Mirror sessions whose target and some source this host serves.
    for session in view.mirror_sessions {
        let Ok(spec) = session.spec::<MirrorSessionSpec>() else {
            continue;
        };
        let here = |p: &String| state.ports.iter().any(|sp| &sp.name == p);
        let sources: Vec<String> = spec
            .source_port_ids
            .iter()
            .filter(|p| here(p))
            .cloned()
            .collect();
        if sources.is_empty() || !here(&spec.target_port_id) {
            continue;
        }
        state.mirrors.push(keel_dataplane::mirror::MirrorSpec {
            name: session.meta.id.clone(),
            ports: sources,
            direction: match spec.direction {
                api_mirror::MirrorDirection::In => keel_dataplane::mirror::MirrorDirection::In,
                api_mirror::MirrorDirection::Out => keel_dataplane::mirror::MirrorDirection::Out,
                api_mirror::MirrorDirection::Both => keel_dataplane::mirror::MirrorDirection::Both,
            },
            filter: spec.filter.map(|f| keel_dataplane::mirror::MirrorFilter {
                protocol: f.protocol,
                cidr: f.cidr,
            }),
            target: keel_dataplane::mirror::MirrorTarget::Port {
                port: spec.target_port_id,
            },
        });
    }
    for subnet_id in &used {
        let Some(subnet) = view.subnets.get(subnet_id) else {
            continue;
        };
        let Ok(spec) = subnet.spec::<SubnetSpec>() else {
            continue;
        };
        let dhcp = spec.enable_dhcp.then(|| DhcpSpec {
            dns_servers: spec
                .dns_servers
                .iter()
                .filter(|d| d.is_ipv4())
                .map(ToString::to_string)
                .collect(),
            server_ip: if gateways.contains_key(subnet_id) {
                None
            } else {
                spec.gateway_ip.map(|g| g.to_string())
            },
            ..DhcpSpec::default()
        });
        state.switches.push(SwitchSpec {
            name: subnet_id.clone(),
            subnet: spec.cidr.trunc().to_string(),
            vlan: None,
            subnet6: None,
            dhcp,
        });
    }
    state
}

/// The VPC load balancers this host's data plane balances (their router
/// has a leg here for a VM's NIC), with their routers. Their VIP's subnet
/// and their members' subnets are added to `used`, so the router gets a
/// leg on each (the data plane needs the VIP and members on its subnets).
fn balanced_here(
    view: &NetworkView<'_>,
    used: &mut BTreeSet<String>,
) -> Vec<(String, ApiLoadBalancer)> {
    let mut out = Vec::new();
    for record in view.load_balancers {
        let Ok(lb) = record.spec::<ApiLoadBalancer>() else {
            continue;
        };
        let (Some(vip_subnet), Some(rid)) = (lb.vip_subnet_id.clone(), lb.router_id.clone()) else {
            continue;
        };
        let Some(router) = view
            .routers
            .iter()
            .find(|r| r.meta.id == rid)
            .and_then(|r| r.spec::<ApiRouter>().ok())
        else {
            continue;
        };
        if !router
            .interfaces
            .iter()
            .any(|i| used.contains(&i.subnet_id))
        {
            continue;
        }
        used.insert(vip_subnet);
        for member in lb.config.pools.iter().flat_map(|p| &p.members) {
            let subnet = router.interfaces.iter().find(|i| {
                view.subnets
                    .get(&i.subnet_id)
                    .and_then(|s| s.spec::<SubnetSpec>().ok())
                    .is_some_and(|s| s.cidr.contains(&member.address))
            });
            if let Some(i) = subnet {
                used.insert(i.subnet_id.clone());
            }
        }
        out.push((rid, lb));
    }
    out
}

/// The status tree of a VPC load balancer, in the proxy's shape: a
/// listener is ONLINE when `forwarded` (the data plane has it); a member
/// is what the data plane's monitor says (`health`: ONLINE, ERROR, or
/// NO_MONITOR), OFFLINE when disabled or drained.
pub fn vpc_lb_status(
    lb: &keel_lb::LoadBalancer,
    forwarded: impl Fn(&str) -> bool,
    health: impl Fn(std::net::IpAddr, u16) -> Option<MemberHealth>,
) -> serde_json::Value {
    let member_status = |m: &keel_lb::model::Member| {
        if !m.admin_state_up || m.weight == 0 {
            return "OFFLINE";
        }
        match health(m.address, m.protocol_port) {
            Some(MemberHealth::Up) => "ONLINE",
            Some(MemberHealth::Down) => "ERROR",
            _ => "NO_MONITOR",
        }
    };
    let online = |up: bool| if up { "ONLINE" } else { "OFFLINE" };
    serde_json::json!({
        "id": lb.id,
        "served_by": "data plane",
        "provisioning_status": "ACTIVE",
        "operating_status": online(lb.admin_state_up),
        "listeners": lb.listeners.iter().map(|l| serde_json::json!({
            "id": l.id,
            "provisioning_status": "ACTIVE",
            "operating_status": online(forwarded(&l.id)),
        })).collect::<Vec<_>>(),
        "pools": lb.pools.iter().map(|p| serde_json::json!({
            "id": p.id,
            "provisioning_status": "ACTIVE",
            "operating_status": online(p.admin_state_up),
            "members": p.members.iter().map(|m| serde_json::json!({
                "id": m.id,
                "address": m.address,
                "protocol_port": m.protocol_port,
                "provisioning_status": "ACTIVE",
                "operating_status": member_status(m),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The `keel dataplane` child and the state it runs with.
pub struct Dataplane {
    keel_bin: PathBuf,
    run_dir: PathBuf,
    running: Option<(Child, DesiredState)>,
}

impl Dataplane {
    pub fn new(keel_bin: PathBuf, run_dir: PathBuf) -> Dataplane {
        Dataplane {
            keel_bin,
            run_dir,
            running: None,
        }
    }

    /// Makes the running data plane serve `state`: nothing to do when it
    /// already does, a restart when it differs, a stop when there is no port.
    pub fn ensure(&mut self, state: &DesiredState) -> Result<(), NetworkError> {
        let socket = self.run_dir.join("dataplane.sock");
        if let Some((child, current)) = &mut self.running {
            if matches!(child.try_wait(), Ok(None)) {
                if current == state {
                    return Ok(());
                }
                // Same NICs: swap the tables in place (connections and
                // learned state survive); only a new port set restarts.
                let same_ports = current
                    .ports
                    .iter()
                    .map(|p| &p.name)
                    .eq(state.ports.iter().map(|p| &p.name));
                if same_ports {
                    let req = keel_dataplane::control::Request::Apply {
                        state: state.clone(),
                    };
                    match keel_dataplane::control::request(&socket, &req) {
                        Ok(keel_dataplane::control::Response::Applied { generation }) => {
                            tracing::info!(generation, "data plane state applied in place");
                            *current = state.clone();
                            self.write_state(state)?;
                            return Ok(());
                        }
                        Ok(other) => {
                            tracing::warn!(answer = ?other, "in-place apply refused; restarting the data plane")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "in-place apply failed; restarting the data plane")
                        }
                    }
                }
            }
        }
        self.stop();
        if state
            .ports
            .iter()
            .all(|p| p.name == uplink_port(&p.interface))
        {
            return Ok(());
        }
        let config = self.write_state(state)?;
        let log_path = self.run_dir.join("dataplane.log");
        let log = std::fs::File::create(&log_path).map_err(NetworkError::Spawn)?;
        let log2 = log.try_clone().map_err(NetworkError::Spawn)?;
        let mut cmd = Command::new(&self.keel_bin);
        crate::children::end_with_agent(&mut cmd);
        cmd.arg("dataplane")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket);
        for port in &state.ports {
            if port.name == uplink_port(&port.interface) {
                cmd.arg("--interface").arg(&port.interface);
                continue;
            }
            let sock = nic_socket(&self.run_dir, &port.name);
            cmd.arg("--vhost-user-net")
                .arg(format!("{}={}", port.name, sock.display()));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(NetworkError::Spawn)?;
        let start = Instant::now();
        let sockets: Vec<PathBuf> = state
            .ports
            .iter()
            .filter(|p| p.name != uplink_port(&p.interface))
            .map(|p| nic_socket(&self.run_dir, &p.name))
            .collect();
        while !sockets.iter().all(|s| s.exists()) && start.elapsed() < START_WAIT {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(NetworkError::Exited {
                    status: status.to_string(),
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(
            ports = state.ports.len(),
            switches = state.switches.len(),
            routers = state.routers.len(),
            "data plane (re)started"
        );
        self.running = Some((child, state.clone()));
        Ok(())
    }

    /// The load-balancer member counters and health of the running data
    /// plane (none when it is not running or does not answer).
    pub fn lb_stats(&self) -> Vec<LbMemberStats> {
        if self.running.is_none() {
            return Vec::new();
        }
        let socket = self.run_dir.join("dataplane.sock");
        match keel_dataplane::control::request(&socket, &keel_dataplane::control::Request::LbStats)
        {
            Ok(keel_dataplane::control::Response::LbStats { members }) => members,
            _ => Vec::new(),
        }
    }

    /// Keeps the state the data plane runs with in `dataplane.json` (its
    /// start-up config, and what an operator reads).
    fn write_state(&self, state: &DesiredState) -> Result<PathBuf, NetworkError> {
        let _ = std::fs::create_dir_all(&self.run_dir);
        let config = self.run_dir.join("dataplane.json");
        let text = serde_json::to_string_pretty(state).unwrap_or_default();
        std::fs::write(&config, text).map_err(|source| NetworkError::WriteState {
            path: config.clone(),
            source,
        })?;
        Ok(config)
    }

    pub fn stop(&mut self) {
        if let Some((mut child, _)) = self.running.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < START_WAIT {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_control::api::records::Meta;
    use serde_json::json;

    fn record(id: &str, spec: serde_json::Value) -> Record {
        Record {
            meta: Meta {
                id: id.into(),
                vdc_id: Some("vdc".into()),
                name: id.into(),
                status: "PENDING".into(),
                revision: 1,
                created_at: 0,
                updated_at: 0,
            },
            parent_id: None,
            spec,
        }
    }

    fn by_id(records: Vec<Record>) -> BTreeMap<String, Record> {
        records
            .into_iter()
            .map(|r| (r.meta.id.clone(), r))
            .collect()
    }

    fn port(id: &str, subnet: &str, ip: &str, mac: &str) -> Record {
        record(
            id,
            json!({"subnet_id": subnet, "vpc_id": "vpc", "mac_address": mac, "fixed_ip": ip,
                   "security_group_ids": [], "description": ""}),
        )
    }

    fn subnet(id: &str, cidr: &str) -> Record {
        record(
            id,
            json!({"vpc_id": "vpc", "cidr": cidr, "gateway_ip": null, "allocation_pools": [],
                   "reserved_ips": [], "dns_servers": [], "enable_dhcp": true, "description": ""}),
        )
    }

    /// Two VMs behind a router with a gateway on an external network: the
    /// uplink, routes and NAT come out as the data plane accepts them.
    #[test]
    fn gateways_and_floating_ips_compile_to_uplink_routes_and_nat() {
        let vms = vec![
            (record("vm1", json!({})), vec!["p1".to_string()]),
            (record("vm2", json!({})), vec!["p2".to_string()]),
        ];
        let mut p1 = port("p1", "s1", "10.0.1.5", "fa:16:3e:00:00:01");
        p1.spec["qos_policy_id"] = json!("q1");
        p1.spec["security_group_ids"] = json!(["web"]);
        let ports = by_id(vec![p1, port("p2", "s1", "10.0.1.6", "fa:16:3e:00:00:02")]);
        let qos = by_id(vec![
            record(
                "q1",
                json!({"description": "", "ingress": null, "dscp_mark": 46,
                       "egress": {"max_kbps": 100000, "max_burst_kbits": 80000}}),
            ),
            record(
                "q2",
                json!({"description": "", "egress": null, "dscp_mark": null,
                       "ingress": {"max_kbps": 5000, "max_burst_kbits": 4000}}),
            ),
        ]);
        let subnets = by_id(vec![
            subnet("s1", "10.0.1.0/24"),
            subnet("s2", "10.0.2.0/24"),
        ]);
        let router = record(
            "r1",
            json!({"description": "", "interfaces": [
                        {"subnet_id": "s1", "ip_address": "10.0.1.1"},
                        {"subnet_id": "s2", "ip_address": "10.0.2.1"}],
                   "routes": [{"destination": "172.16.0.0/12", "nexthop": "10.0.1.254"},
                              {"destination": "192.168.0.0/16", "nexthop": "10.0.2.254"}],
                   "external_gateway": {"external_network_id": "ext", "enable_snat": true,
                                        "external_ip": "198.18.0.2"},
                   "firewall_rules": [{"protocol": "tcp", "port_range_min": 22,
                                       "port_range_max": 22, "action": "deny"}],
                   "policies": [
                       {"from_subnet_id": "s1", "dst_cidr": "172.16.0.0/12", "action": "reroute",
                        "nexthop": "10.0.1.254", "priority": 5},
                       {"from_subnet_id": "s2", "action": "drop"}]}),
        );
        let external = by_id(vec![record(
            "ext",
            json!({"physical_network": "public", "cidr": "198.18.0.0/24",
                   "gateway_ip": "198.18.0.1", "allocation_pools": [], "reserved_ips": [],
                   "description": ""}),
        )]);
        let fips = vec![
            record(
                "f1",
                json!({"external_network_id": "ext", "floating_ip_address": "198.18.0.50",
                       "port_id": "p2", "fixed_ip_address": "10.0.1.6", "router_id": "r1",
                       "description": "", "qos_policy_id": "q2"}),
            ),
            // Port forwarding: TCP 2222 → p1:22.
            record(
                "f3",
                json!({"external_network_id": "ext", "floating_ip_address": "198.18.0.52",
                       "port_id": null, "fixed_ip_address": null, "router_id": "r1",
                       "description": "", "port_forwardings": [
                           {"protocol": "tcp", "external_port": 2222, "internal_port_id": "p1",
                            "internal_ip_address": "10.0.1.5", "internal_port": 22}]}),
            ),
            // Not associated: no translation.
            record(
                "f2",
                json!({"external_network_id": "ext", "floating_ip_address": "198.18.0.51",
                       "port_id": null, "fixed_ip_address": null, "router_id": null,
                       "description": ""}),
            ),
        ];
        // p1's copies (sent only, TCP) go to p2; a session whose target is
        // on another host is left out.
        let mirrors = vec![
            record(
                "m1",
                json!({"description": "", "source_port_ids": ["p1"], "direction": "out",
                       "filter": {"protocol": "tcp", "cidr": null}, "target_port_id": "p2"}),
            ),
            record(
                "m2",
                json!({"description": "", "source_port_ids": ["p1"], "direction": "both",
                       "filter": null, "target_port_id": "elsewhere"}),
            ),
        ];
        let uplinks: BTreeMap<String, String> =
            [("public".to_string(), "veth-up".to_string())].into();
        // p1's group allows the web from the members of "others" (no port
        // here) and denies one address above it.
        let groups = by_id(vec![
            record(
                "web",
                json!({"description": "", "rules": [
                    {"direction": "ingress", "protocol": "tcp", "port_range_min": 80,
                     "port_range_max": 80, "remote_group_id": "others"},
                    {"direction": "ingress", "protocol": "any", "remote_cidr": "10.0.1.6/32",
                     "action": "deny", "priority": 10},
                    {"direction": "ingress", "protocol": "icmp", "icmp_type": 8},
                    {"direction": "ingress", "protocol": "tcp", "remote_address_group_id": "ag1",
                     "port_set_id": "ps1"},
                    {"direction": "ingress", "protocol": "udp", "remote_address_group_id": "gone"}]}),
            ),
            record("others", json!({"description": "", "rules": []})),
        ]);
        // The rules name ag1 and ps1 (and a group that is gone); ag2 is unused.
        let address_groups = by_id(vec![
            record(
                "ag1",
                json!({"description": "", "addresses": ["10.9.0.0/16", "fd00:9::/64"]}),
            ),
            record(
                "ag2",
                json!({"description": "", "addresses": ["10.8.0.0/16"]}),
            ),
        ]);
        let port_sets = by_id(vec![record(
            "ps1",
            json!({"description": "", "ports": [{"min": 80, "max": 80}, {"min": 8000, "max": 8099}]}),
        )]);
        let view = NetworkView {
            vms: &vms,
            ports: &ports,
            subnets: &subnets,
            routers: std::slice::from_ref(&router),
            groups: &groups,
            address_groups: &address_groups,
            port_sets: &port_sets,
            external_networks: &external,
            floating_ips: &fips,
            qos_policies: &qos,
            mirror_sessions: &mirrors,
            load_balancers: &[],
            uplinks: &uplinks,
        };
        let state = desired_state(&view);
        let uplink = state
            .ports
            .iter()
            .find(|p| p.interface == "veth-up")
            .unwrap();
        assert_eq!(uplink.switch, "ext");
        assert!(!uplink.port_security);
        assert_eq!(uplink.name, uplink_port("veth-up"));
        let r = &state.routers[0];
        let legs: Vec<(&str, &str)> = r
            .ports
            .iter()
            .map(|p| (p.switch.as_str(), p.ip.as_str()))
            .collect();
        // s2 has no port on this host: not routed here.
        assert_eq!(legs, [("s1", "10.0.1.1"), ("ext", "198.18.0.2")]);
        let routes: Vec<(&str, &str)> = r
            .static_routes
            .iter()
            .map(|s| (s.prefix.as_str(), s.next_hop.as_str()))
            .collect();
        assert_eq!(
            routes,
            [("0.0.0.0/0", "198.18.0.1"), ("172.16.0.0/12", "10.0.1.254")],
            "the default route to the external gateway; a route via a subnet not here is left out"
        );
        let nat: Vec<(NatKind, &str, &str)> = state
            .nat
            .iter()
            .map(|n| (n.kind, n.external_ip.as_str(), n.logical_ip.as_str()))
            .collect();
        assert_eq!(
            nat,
            [
                (NatKind::Snat, "198.18.0.2", "10.0.1.0/24"),
                (NatKind::DnatAndSnat, "198.18.0.50", "10.0.1.6"),
                (NatKind::Dnat, "198.18.0.52", "10.0.1.5"),
            ]
        );
        let qos_entries: Vec<_> = state
            .qos
            .iter()
            .map(|q| {
                (
                    q.port.as_deref(),
                    q.floating_ip.as_deref(),
                    q.ingress.map(|m| m.rate_kbps),
                    q.egress.map(|m| m.burst_bytes),
                    q.dscp,
                )
            })
            .collect();
        assert_eq!(
            qos_entries,
            [
                (Some("p1"), None, None, Some(10_000_000), Some(46)),
                (None, Some("198.18.0.50"), Some(5000), None, None),
            ]
        );
        // The firewall rule, and the one policy whose subnet is routed here.
        assert_eq!(state.firewall.len(), 1);
        assert_eq!(state.firewall[0].action, RuleAction::Deny);
        assert_eq!(state.router_policies.len(), 1);
        assert_eq!(
            state.router_policies[0].next_hop.as_deref(),
            Some("10.0.1.254")
        );
        let forward = &state.nat[2];
        assert_eq!(
            (
                forward.protocol.as_deref(),
                forward.external_port,
                forward.logical_port
            ),
            (Some("tcp"), Some(2222), Some(22))
        );
        let groups: Vec<(&str, usize, usize)> = state
            .security_groups
            .iter()
            .map(|g| (g.name.as_str(), g.ports.len(), g.rules.len()))
            .collect();
        // The remote group comes along (no member here); a rule without a
        // CIDR covers both families (the address-group rule too: its group
        // holds both), the ICMP type rule only IPv4; the rule naming a gone
        // address group is left out.
        assert_eq!(groups, [("web", 1, 6), ("others", 0, 0)]);
        let set_rule = &state.security_groups[0].rules[4];
        assert_eq!(
            (
                set_rule.remote_address_group.as_deref(),
                set_rule.port_set.as_deref()
            ),
            (Some("ag1"), Some("ps1"))
        );
        assert_eq!(
            state.address_groups,
            [keel_dataplane::model::AddressGroupSpec {
                name: "ag1".into(),
                addresses: vec!["10.9.0.0/16".into(), "fd00:9::/64".into()],
            }]
        );
        assert_eq!(state.port_sets.len(), 1);
        assert_eq!(
            state.port_sets[0].ports,
            [
                keel_dataplane::model::PortRangeSpec { min: 80, max: 80 },
                keel_dataplane::model::PortRangeSpec {
                    min: 8000,
                    max: 8099
                }
            ]
        );
        let deny = &state.security_groups[0].rules[2];
        assert_eq!((deny.action, deny.priority), (RuleAction::Deny, 10));
        assert_eq!(state.mirrors.len(), 1);
        assert_eq!(state.mirrors[0].ports, ["p1"]);
        // The data plane accepts it as is.
        let interfaces: Vec<String> = state.ports.iter().map(|p| p.interface.clone()).collect();
        keel_dataplane::config::compile(&state, &interfaces, 1).unwrap();

        // Without an uplink for the physical network: routed inside only.
        let none = BTreeMap::new();
        let state = desired_state(&NetworkView {
            uplinks: &none,
            ..view
        });
        assert!(state.nat.is_empty());
        assert_eq!(state.routers[0].ports.len(), 1);
        assert!(state.ports.iter().all(|p| p.port_security));
    }

    #[test]
    fn vpc_load_balancers_are_balanced_by_their_router_where_it_has_a_leg() {
        let vms = vec![(
            record("vm1", json!({})),
            vec!["p1".to_string(), "p2".to_string()],
        )];
        let ports = by_id(vec![
            port("p1", "s1", "10.0.1.5", "fa:16:3e:00:00:01"),
            port("p2", "s1", "10.0.1.6", "fa:16:3e:00:00:02"),
        ]);
        let subnets = by_id(vec![
            subnet("s1", "10.0.1.0/24"),
            subnet("s2", "10.0.2.0/24"),
            subnet("s3", "10.0.3.0/24"),
        ]);
        let router = |id: &str, subnets: &[&str]| {
            let interfaces: Vec<serde_json::Value> = subnets
                .iter()
                .enumerate()
                .map(|(i, s)| json!({"subnet_id": s, "ip_address": format!("10.0.{}.1", i + 1)}))
                .collect();
            record(
                id,
                json!({"description": "", "interfaces": interfaces, "routes": []}),
            )
        };
        let routers = vec![router("r1", &["s1", "s2"]), router("r3", &["s3"])];
        let lb = |id: &str, vip: &str, subnet: &str, router: &str| {
            record(
                id,
                json!({"description": "", "vip_subnet_id": subnet, "vip_port_id": "vp",
                       "router_id": router, "config": {
                    "id": id, "vip_address": vip,
                    "listeners": [{"id": format!("{id}-l"), "protocol": "TCP", "protocol_port": 80,
                                   "default_pool_id": "p"}],
                    "pools": [{"id": "p", "protocol": "TCP", "lb_algorithm": "SOURCE_IP_PORT",
                               "members": [
                        {"id": "m1", "address": "10.0.1.5", "protocol_port": 8080},
                        {"id": "m2", "address": "10.0.1.6", "protocol_port": 8080,
                         "admin_state_up": false}]}]}}),
            )
        };
        // lb1's VIP is on s2, where no VM of this host is: s2 is routed
        // here for it. lb3's router has no leg here: left to other hosts.
        let lbs = vec![
            lb("lb1", "10.0.2.100", "s2", "r1"),
            lb("lb3", "10.0.3.100", "s3", "r3"),
        ];
        let none = BTreeMap::new();
        let empty = BTreeMap::new();
        let state = desired_state(&NetworkView {
            vms: &vms,
            ports: &ports,
            subnets: &subnets,
            routers: &routers,
            groups: &empty,
            address_groups: &empty,
            port_sets: &empty,
            external_networks: &empty,
            floating_ips: &[],
            qos_policies: &empty,
            mirror_sessions: &[],
            load_balancers: &lbs,
            uplinks: &none,
        });
        assert_eq!(state.routers.len(), 1);
        let legs: Vec<&str> = state.routers[0]
            .ports
            .iter()
            .map(|p| p.switch.as_str())
            .collect();
        assert_eq!(legs, ["s1", "s2"]);
        assert_eq!(state.load_balancers.len(), 1);
        let l = &state.load_balancers[0];
        assert_eq!(
            (l.name.as_str(), l.router.as_str(), l.vip.as_str(), l.port),
            ("lb1-l", "r1", "10.0.2.100", 80)
        );
        let weights: Vec<u16> = l.members.iter().map(|m| m.weight).collect();
        assert_eq!(weights, [1, 0], "the disabled member is drained");
        let interfaces: Vec<String> = state.ports.iter().map(|p| p.interface.clone()).collect();
        keel_dataplane::config::compile(&state, &interfaces, 1).unwrap();
        let config: keel_lb::LoadBalancer =
            serde_json::from_value(lbs[0].spec["config"].clone()).unwrap();
        let down = vpc_lb_status(&config, |_| true, |_, _| Some(MemberHealth::Down));
        assert_eq!(down["pools"][0]["members"][0]["operating_status"], "ERROR");
        let tree = vpc_lb_status(&config, |id| id == "lb1-l", |_, _| None);
        assert_eq!(tree["listeners"][0]["operating_status"], "ONLINE");
        assert_eq!(
            tree["pools"][0]["members"][0]["operating_status"],
            "NO_MONITOR"
        );
        assert_eq!(
            tree["pools"][0]["members"][1]["operating_status"],
            "OFFLINE"
        );
    }
}
