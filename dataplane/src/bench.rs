//! Benchmark kernels for `keel bench dataplane`: an in-memory generator
//! port → one worker → an in-memory sink port, and the peer: the same
//! generator → sink with no pipeline (the I/O ceiling of these ports).
//!
//! Lives here (not in keel-bench) so the crate's tests can check that every
//! scenario forwards what it should, without timing anything.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::config::ConfigHandle;
use crate::counters::Stats;
use crate::engine::Worker;
use crate::model::{DesiredState, PortSpec, RouterPortSpec, RouterSpec, SwitchSpec};
use crate::packet::build::udp64;
use crate::packet::headers::{mac_to_string, Mac};
use crate::port::{MemPort, PacketBuf, Port, BATCH};

/// What a scenario forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// L2 switching to `n` bound destination MACs.
    L2 { macs: u32 },
    /// L2 → distributed router → L2, to `n` hosts on the far subnet.
    Routed { hosts: u32 },
}

/// One timed run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub generated: u64,
    pub delivered: u64,
    pub seconds: f64,
}

impl Run {
    /// Million packets per second delivered.
    pub fn mpps(&self) -> f64 {
        self.delivered as f64 / self.seconds / 1e6
    }
    /// Nanoseconds per packet.
    pub fn ns_per_packet(&self) -> f64 {
        self.seconds * 1e9 / self.delivered.max(1) as f64
    }
}

const SRC: Mac = [2, 0, 0, 0, 0, 1];
const GW_A: Mac = [2, 0, 0, 0, 0xff, 1];

fn host_mac(i: u32) -> Mac {
    let b = i.to_be_bytes();
    [2, 0, 1, b[1], b[2], b[3]]
}

fn port(name: String, switch: &str, interface: &str, mac: Mac, ip: Ipv4Addr) -> PortSpec {
    PortSpec {
        name,
        switch: switch.into(),
        interface: interface.into(),
        mac: Some(mac_to_string(&mac)),
        ips: vec![ip.to_string()],
        port_security: true,
    }
}

/// The desired state and the generator's frames (60 bytes: 64 on the wire with FCS).
pub fn scenario(s: Scenario) -> (DesiredState, Vec<Vec<u8>>) {
    let src_ip = Ipv4Addr::new(10, 0, 0, 1);
    let (far_switch, far_net, n) = match s {
        Scenario::L2 { macs } => ("a", Ipv4Addr::new(10, 0, 0, 0), macs),
        Scenario::Routed { hosts } => ("b", Ipv4Addr::new(10, 1, 0, 0), hosts),
    };
    let host_ip = |i: u32| Ipv4Addr::from(u32::from(far_net) + 2 + i);
    let mut state = DesiredState {
        switches: vec![SwitchSpec {
            name: "a".into(),
            subnet: "10.0.0.0/16".into(),
            vlan: None,
            subnet6: None,
            dhcp: None,
        }],
        ports: vec![port("src".into(), "a", "gen", SRC, src_ip)],
        routers: vec![],
        ..DesiredState::default()
    };
    for i in 0..n {
        state.ports.push(port(
            format!("dst{i}"),
            far_switch,
            "sink",
            host_mac(i),
            host_ip(i),
        ));
    }
    let frames = (0..n)
        .map(|i| match s {
            Scenario::L2 { .. } => udp64(host_mac(i), SRC, src_ip, host_ip(i)),
            Scenario::Routed { .. } => udp64(GW_A, SRC, src_ip, host_ip(i)),
        })
        .collect();
    if let Scenario::Routed { .. } = s {
        state.switches.push(SwitchSpec {
            name: "b".into(),
            subnet: "10.1.0.0/16".into(),
            vlan: None,
            subnet6: None,
            dhcp: None,
        });
        state.routers.push(RouterSpec {
            name: "r".into(),
            ports: vec![
                RouterPortSpec {
                    switch: "a".into(),
                    mac: mac_to_string(&GW_A),
                    ip: "10.0.255.254".into(),
                    ip6: None,
                },
                RouterPortSpec {
                    switch: "b".into(),
                    mac: "02:00:00:00:ff:02".into(),
                    ip: "10.1.255.254".into(),
                    ip6: None,
                },
            ],
            static_routes: vec![],
        });
    }
    (state, frames)
}

fn interfaces() -> Vec<String> {
    vec!["gen".into(), "sink".into()]
}

/// Generator → worker (full pipeline) → sink, for `packets` frames.
pub fn run_pipeline(s: Scenario, packets: u64) -> Result<Run, crate::config::ConfigError> {
    run_pipeline_with_cache(s, packets, crate::flowcache::DEFAULT_ENTRIES)
}

/// [`run_pipeline`] with a flow cache of `entries` per worker (0 = off).
pub fn run_pipeline_with_cache(
    s: Scenario,
    packets: u64,
    entries: usize,
) -> Result<Run, crate::config::ConfigError> {
    let (state, frames) = scenario(s);
    let config = ConfigHandle::new(interfaces());
    config.apply(state)?;
    let sink = MemPort::sink("sink");
    let delivered = sink.counters();
    let ports: Vec<Box<dyn Port>> = vec![
        Box::new(MemPort::generator("gen", frames, packets)),
        Box::new(sink),
    ];
    let mut worker = Worker::new(ports, config.tables(), Arc::new(Stats::new(&interfaces())))
        .with_flow_cache(entries);
    let start = Instant::now();
    while worker.poll_once() > 0 {}
    let seconds = start.elapsed().as_secs_f64();
    Ok(Run {
        generated: packets,
        delivered: delivered.packets.load(Ordering::Relaxed),
        seconds,
    })
}

/// A stateful scenario, run with its feature on and, as the peer, off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stateful {
    /// L2 to `hosts` ports that share a security group of `rules` rules
    /// (the allowing rule is the last one checked), `flows` UDP connections.
    SecurityGroups { hosts: u32, rules: u32, flows: u32 },
    /// L2 to `hosts` ports whose group has one allowing rule matching an
    /// address group of `prefixes` prefixes (the sender's one last in
    /// address order) and a port set of 64 ranges, `flows` UDP connections.
    /// Off: the same policy expanded into one rule per prefix (port 53
    /// only), the sender's rule checked last, as a compiler without set
    /// matches would emit it.
    SecurityGroupSets {
        hosts: u32,
        prefixes: u32,
        flows: u32,
    },
    /// Routed to one far host through SNAT, `flows` UDP connections.
    Snat { flows: u32 },
    /// `flows` UDP connections to an L4 load-balancer VIP (10.0.255.100:53
    /// on the client's subnet) over `members` far hosts: Maglev pick + DNAT
    /// on each connection's first packet, conntrack translation after. Off:
    /// the same number of flows routed straight to the member addresses.
    Lb4 { members: u32, flows: u32 },
}

/// The VIP of [`Stateful::Lb4`].
pub const LB_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 255, 100);

fn with_sport(mut frame: Vec<u8>, sport: u16) -> Vec<u8> {
    // UDP source port at 34; the UDP checksum of these frames is 0 (none).
    if let Some(p) = frame.get_mut(34..36) {
        p.copy_from_slice(&sport.to_be_bytes());
    }
    frame
}

/// The desired state and frames of a stateful scenario, `enabled` or not.
pub fn stateful_scenario(s: Stateful, enabled: bool) -> (DesiredState, Vec<Vec<u8>>) {
    use crate::model::{
        NatKind, NatRuleSpec, RuleAction, RuleDirection, SecurityGroupSpec, SecurityRuleSpec,
    };
    let (base, flows) = match s {
        Stateful::SecurityGroups { hosts, flows, .. }
        | Stateful::SecurityGroupSets { hosts, flows, .. } => (Scenario::L2 { macs: hosts }, flows),
        Stateful::Snat { flows } => (Scenario::Routed { hosts: 1 }, flows),
        Stateful::Lb4 { members, flows } => (Scenario::Routed { hosts: members }, flows),
    };
    let (mut state, mut templates) = scenario(base);
    if let (Stateful::Lb4 { .. }, true) = (s, enabled) {
        // Every flow goes to the VIP; the client port tells them apart.
        templates = vec![udp64(GW_A, SRC, Ipv4Addr::new(10, 0, 0, 1), LB_VIP)];
    }
    let n = u32::try_from(templates.len()).unwrap_or(1).max(1);
    let frames = (0..flows)
        .map(|f| {
            let t = templates.get((f % n) as usize).cloned().unwrap_or_default();
            with_sport(t, 1024 + u16::try_from(f / n).unwrap_or(u16::MAX - 1024))
        })
        .collect();
    if let Stateful::SecurityGroupSets { prefixes, .. } = s {
        let group = set_group(&mut state, prefixes, enabled);
        state.security_groups.push(group);
    }
    if enabled {
        match s {
            Stateful::SecurityGroupSets { .. } => {}
            Stateful::SecurityGroups { rules, .. } => {
                let rule = |i: u32, allow: bool| SecurityRuleSpec {
                    direction: RuleDirection::Ingress,
                    ethertype: Default::default(),
                    protocol: Some(if allow { "udp" } else { "tcp" }.into()),
                    port_min: Some(if allow {
                        53
                    } else {
                        1000 + u16::try_from(i).unwrap_or(0)
                    }),
                    port_max: None,
                    icmp_type: None,
                    icmp_code: None,
                    remote_cidr: Some("10.0.0.0/16".into()),
                    remote_group: None,
                    remote_address_group: None,
                    port_set: None,
                    priority: if allow { 0 } else { 1000 + i },
                    action: if allow {
                        RuleAction::Allow
                    } else {
                        RuleAction::Deny
                    },
                };
                state.security_groups.push(SecurityGroupSpec {
                    name: "bench".into(),
                    ports: state
                        .ports
                        .iter()
                        .filter(|p| p.name.starts_with("dst"))
                        .map(|p| p.name.clone())
                        .collect(),
                    rules: (1..rules.max(1))
                        .map(|i| rule(i, false))
                        .chain([rule(0, true)])
                        .collect(),
                });
            }
            Stateful::Snat { .. } => state.nat.push(NatRuleSpec {
                router: "r".into(),
                kind: NatKind::Snat,
                external_ip: "10.1.255.254".into(),
                logical_ip: "10.0.0.0/16".into(),
                protocol: None,
                external_port: None,
                logical_port: None,
                port_min: None,
                port_max: None,
            }),
            Stateful::Lb4 { members, .. } => {
                let far: Vec<String> = state
                    .ports
                    .iter()
                    .filter(|p| p.name.starts_with("dst"))
                    .take(members as usize)
                    .filter_map(|p| p.ips.first().cloned())
                    .collect();
                state.load_balancers.push(crate::lb4::LoadBalancerSpec {
                    name: "bench".into(),
                    router: "r".into(),
                    vip: LB_VIP.to_string(),
                    protocol: crate::lb4::LbProtocol::Udp,
                    port: 53,
                    hash: crate::lb4::LbHash::default(),
                    monitor: None,
                    members: far
                        .into_iter()
                        .map(|ip| crate::lb4::LbMemberSpec {
                            ip,
                            port: 5353,
                            weight: 1,
                        })
                        .collect(),
                });
            }
        }
    }
    (state, frames)
}

/// The group of [`Stateful::SecurityGroupSets`] (adding its address group
/// and port set to `state` when `sets`).
fn set_group(
    state: &mut DesiredState,
    prefixes: u32,
    sets: bool,
) -> crate::model::SecurityGroupSpec {
    use crate::model::{
        AddressGroupSpec, PortRangeSpec, PortSetSpec, RuleAction, RuleDirection, SecurityGroupSpec,
        SecurityRuleSpec,
    };
    // 172.16.0.0/24, 172.16.1.0/24, ..., then the sender's 10.0.0.0/16.
    let mut nets: Vec<String> = (0..prefixes.saturating_sub(1))
        .map(|i| Ipv4Addr::from(0xac10_0000u32 + (i << 8)).to_string() + "/24")
        .collect();
    nets.push("10.0.0.0/16".into());
    let rule = |remote_cidr: Option<String>, sets: bool| SecurityRuleSpec {
        direction: RuleDirection::Ingress,
        ethertype: Default::default(),
        protocol: Some("udp".into()),
        port_min: (!sets).then_some(53),
        port_max: None,
        icmp_type: None,
        icmp_code: None,
        remote_cidr,
        remote_group: None,
        remote_address_group: sets.then(|| "bench".into()),
        port_set: sets.then(|| "bench".into()),
        priority: 0,
        action: RuleAction::Allow,
    };
    let rules = if sets {
        state.address_groups.push(AddressGroupSpec {
            name: "bench".into(),
            addresses: nets,
        });
        // Single ports 1000, 1010, ..., 1620, and 50-60 (the frames' 53).
        let mut ports: Vec<PortRangeSpec> = (0..63u16)
            .map(|i| PortRangeSpec {
                min: 1000 + i * 10,
                max: 1000 + i * 10,
            })
            .collect();
        ports.push(PortRangeSpec { min: 50, max: 60 });
        state.port_sets.push(PortSetSpec {
            name: "bench".into(),
            ports,
        });
        vec![rule(None, true)]
    } else {
        nets.into_iter().map(|n| rule(Some(n), false)).collect()
    };
    SecurityGroupSpec {
        name: "bench".into(),
        ports: state
            .ports
            .iter()
            .filter(|p| p.name.starts_with("dst"))
            .map(|p| p.name.clone())
            .collect(),
        rules,
    }
}

/// Generator → worker → sink for a stateful scenario: `packets` frames
/// cycling over the flows (the first pass sets the connections up). Also
/// returns the conntrack bytes per connection.
pub fn run_stateful(
    s: Stateful,
    enabled: bool,
    packets: u64,
) -> Result<(Run, usize), crate::config::ConfigError> {
    let (state, frames) = stateful_scenario(s, enabled);
    let flows = frames.len();
    let config = ConfigHandle::new(interfaces());
    config.apply(state)?;
    let sink = MemPort::sink("sink");
    let delivered = sink.counters();
    let ports: Vec<Box<dyn Port>> = vec![
        Box::new(MemPort::generator("gen", frames, packets)),
        Box::new(sink),
    ];
    let worker = Worker::new(ports, config.tables(), Arc::new(Stats::new(&interfaces())));
    // Room for every flow (a connection per flow and zone).
    let mut worker = worker.with_connections(flows + flows / 4 + 1024);
    let bytes = worker.conntrack_bytes_per_connection();
    let start = Instant::now();
    while worker.poll_once() > 0 {}
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        Run {
            generated: packets,
            delivered: delivered.packets.load(Ordering::Relaxed),
            seconds,
        },
        bytes,
    ))
}

/// A network service measured with the feature on and, as the peer, off:
/// 64-byte frames routed to 256 hosts, as in [`Scenario::Routed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// An egress meter (rate far above the offered load, so every frame is
    /// metered and conforms) plus DSCP marking on the sending port.
    Meter,
    /// A mirror session on the sending port (direction out, no filter),
    /// ERSPAN II to a collector interface: one encapsulated copy per frame.
    Mirror,
    /// IPv6 UDP to `64:ff9b::<host>` translated to IPv4 (256 sessions); the
    /// peer ("off") routes the same IPv6 frames natively to the hosts' IPv6
    /// addresses.
    Nat64,
    /// 16 router policies on the router, the matching one (allow) checked last.
    Policy,
}

/// An IPv6 UDP frame (80 bytes) from the generator's port to `dst`.
fn udp6(dst_mac: Mac, src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr) -> Vec<u8> {
    use crate::packet::checksum::{accumulate, finish};
    let mut udp = [0u8; 26];
    udp[0..2].copy_from_slice(&12345u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&26u16.to_be_bytes());
    let mut sum = accumulate(0, &src.octets());
    sum = accumulate(sum, &dst.octets());
    sum = accumulate(sum, &[0, 0, 0, 26, 0, 0, 0, 17]);
    let c = finish(accumulate(sum, &udp));
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(80);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 26, 17, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&udp);
    f
}

/// Interfaces of the service runs: the generator, the sink, a mirror collector.
fn service_interfaces() -> Vec<String> {
    vec!["gen".into(), "sink".into(), "collector".into()]
}

/// The desired state and frames of a service scenario, `enabled` or not.
pub fn service_scenario(s: Service, enabled: bool) -> (DesiredState, Vec<Vec<u8>>) {
    let (mut state, frames) = scenario(Scenario::Routed { hosts: 256 });
    if s == Service::Nat64 {
        return nat64_scenario(state, enabled);
    }
    if enabled {
        match s {
            Service::Meter => state.qos.push(crate::qos::QosSpec {
                port: Some("src".into()),
                floating_ip: None,
                ingress: None,
                egress: Some(crate::qos::MeterSpec {
                    rate_kbps: crate::qos::MAX_RATE_KBPS,
                    burst_bytes: 1 << 20,
                }),
                dscp: Some(46),
            }),
            Service::Nat64 => {}
            Service::Policy => {
                for i in 0..16u32 {
                    let last = i == 15;
                    state.router_policies.push(crate::policy::RouterPolicySpec {
                        router: "r".into(),
                        priority: 100 - i,
                        from_switch: Some("a".into()),
                        src_cidr: Some("10.0.0.0/16".into()),
                        dst_cidr: Some(if last {
                            "10.1.0.0/16".into()
                        } else {
                            format!("192.168.{i}.0/24")
                        }),
                        protocol: Some("udp".into()),
                        action: if last {
                            crate::policy::PolicyAction::Allow
                        } else {
                            crate::policy::PolicyAction::Drop
                        },
                        next_hop: None,
                    });
                }
            }
            Service::Mirror => state.mirrors.push(crate::mirror::MirrorSpec {
                name: "bench".into(),
                ports: vec!["src".into()],
                direction: crate::mirror::MirrorDirection::Out,
                filter: None,
                target: crate::mirror::MirrorTarget::Erspan {
                    interface: "collector".into(),
                    src_mac: "02:00:00:00:ee:01".into(),
                    dst_mac: "02:00:00:00:ee:02".into(),
                    src_ip: "198.18.0.1".into(),
                    dst_ip: "198.18.0.2".into(),
                    session_id: 1,
                },
            }),
        }
    }
    (state, frames)
}

fn nat64_scenario(mut state: DesiredState, enabled: bool) -> (DesiredState, Vec<Vec<u8>>) {
    let v6 = |net: u16, host: u32| {
        let [_, _, hi, lo] = (host & 0xffff).to_be_bytes();
        std::net::Ipv6Addr::new(0xfd00, net, 0, 0, 0, 0, 0, u16::from_be_bytes([hi, lo]))
    };
    for (sw, net) in state.switches.iter_mut().zip([0xa, 0xb]) {
        sw.subnet6 = Some(format!("fd00:{net:x}::/64"));
    }
    if let Some(r) = state.routers.first_mut() {
        for (rp, net) in r.ports.iter_mut().zip([0xa, 0xb]) {
            rp.ip6 = Some(v6(net, 0xfffe).to_string());
        }
    }
    let mut frames = Vec::new();
    for (i, p) in state.ports.iter_mut().enumerate() {
        if i == 0 {
            p.ips.push(v6(0xa, 1).to_string());
            continue;
        }
        let host = u32::try_from(i - 1).unwrap_or(0) + 2;
        p.ips.push(v6(0xb, host).to_string());
        let dst = if enabled {
            // 64:ff9b::10.1.x.y, the host's IPv4 address.
            std::net::Ipv6Addr::from(0x0064_ff9b_u128 << 96 | u128::from(0x0a01_0000 + host))
        } else {
            v6(0xb, host)
        };
        frames.push(udp6(GW_A, v6(0xa, 1), dst));
    }
    if enabled {
        state.nat64.push(crate::nat64::Nat64Spec {
            router: "r".into(),
            prefix: None,
            pool: vec!["10.1.255.253".into()],
            port_min: None,
            port_max: None,
        });
    }
    (state, frames)
}

/// Generator → worker → sink (+ collector) for a service scenario. Returns
/// the run (frames delivered to the sink) and the frames the collector got.
pub fn run_service(
    s: Service,
    enabled: bool,
    packets: u64,
) -> Result<(Run, u64), crate::config::ConfigError> {
    let (state, frames) = service_scenario(s, enabled);
    let config = ConfigHandle::new(service_interfaces());
    config.apply(state)?;
    let sink = MemPort::sink("sink");
    let delivered = sink.counters();
    let collector = MemPort::sink("collector");
    let mirrored = collector.counters();
    let ports: Vec<Box<dyn Port>> = vec![
        Box::new(MemPort::generator("gen", frames, packets)),
        Box::new(sink),
        Box::new(collector),
    ];
    let mut worker = Worker::new(
        ports,
        config.tables(),
        Arc::new(Stats::new(&service_interfaces())),
    );
    let start = Instant::now();
    while worker.poll_once() > 0 {}
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        Run {
            generated: packets,
            delivered: delivered.packets.load(Ordering::Relaxed),
            seconds,
        },
        mirrored.packets.load(Ordering::Relaxed),
    ))
}

/// How [`run_workers`] feeds its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Each worker's generator holds only frames steered to it (what a NIC
    /// with symmetric RSS or an eBPF fanout program would deliver).
    Steered,
    /// Each worker's generator holds every flow: about `(n-1)/n` of its frames
    /// belong to another worker and cross a handoff lane (AF_PACKET's
    /// fanout hash, which cannot match our steering hash).
    Mixed,
}

/// `workers` worker threads (pinned round robin to the allowed CPUs), each
/// with its own generator of `packets_per_worker` frames and its own sink,
/// all forwarding `s` through one set of tables. Times from a common start
/// to the last worker's end. Also returns the frames dropped because a
/// handoff lane was full (a worker fell [`crate::handoff::LANE_DEPTH`]
/// frames behind).
pub fn run_workers(
    s: Scenario,
    workers: usize,
    packets_per_worker: u64,
    feed: Feed,
) -> Result<(Run, u64), crate::config::ConfigError> {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;
    let (state, frames) = scenario(s);
    let config = ConfigHandle::new(interfaces());
    config.apply(state)?;
    let tables = config.tables().load_full();
    let workers = workers.max(1);
    let fabric = crate::handoff::Fabric::new(workers);
    let stats = Arc::new(Stats::with_workers(&interfaces(), workers));
    let cpus = crate::engine::allowed_cpus();
    let start = Arc::new(Barrier::new(workers + 1));
    let done = Arc::new(AtomicUsize::new(0));
    let mut sinks = Vec::new();
    let mut threads = Vec::new();
    for w in 0..workers {
        let mine: Vec<Vec<u8>> = match feed {
            Feed::Mixed => frames.clone(),
            Feed::Steered => frames
                .iter()
                .filter(|f| crate::steer::frame_worker(&tables, f, workers) == w)
                .cloned()
                .collect(),
        };
        let sink = MemPort::sink("sink");
        sinks.push(sink.counters());
        let ports: Vec<Box<dyn Port>> = vec![
            Box::new(MemPort::generator("gen", mine, packets_per_worker)),
            Box::new(sink),
        ];
        let mut worker = Worker::new(ports, config.tables(), Arc::clone(&stats))
            .with_shard(w, Arc::clone(&fabric));
        let cpu = cpus.get(w % cpus.len().max(1)).copied();
        let (start, done, fabric) = (Arc::clone(&start), Arc::clone(&done), Arc::clone(&fabric));
        threads.push(std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                crate::engine::pin_to(cpu);
            }
            start.wait();
            while worker.poll_once() > 0 {}
            done.fetch_add(1, Ordering::SeqCst);
            // Serve lanes until every generator is exhausted and drained.
            while done.load(Ordering::SeqCst) < workers
                || worker.poll_once() > 0
                || fabric.pending(w)
            {
                worker.poll_once();
            }
            Instant::now()
        }));
    }
    start.wait();
    let t0 = Instant::now();
    let end = threads
        .into_iter()
        .filter_map(|t| t.join().ok())
        .max()
        .unwrap_or(t0);
    let full_at = crate::counters::WORKER_COUNTERS
        .iter()
        .position(|n| *n == "handoff_full")
        .unwrap_or(usize::MAX);
    let full = stats
        .workers
        .iter()
        .filter_map(|w| w.counts.get(full_at))
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    Ok((
        Run {
            generated: packets_per_worker * workers as u64,
            delivered: sinks
                .iter()
                .map(|c| c.packets.load(Ordering::Relaxed))
                .sum(),
            seconds: end.duration_since(t0).as_secs_f64(),
        },
        full,
    ))
}

/// The machine's own scaling, the control for [`run_workers`]: the
/// generator → sink copy loop of [`run_baseline`] (no pipeline, nothing
/// shared) on `threads` pinned threads at once. Times from a common start
/// to the last thread's end.
pub fn run_baseline_threads(s: Scenario, threads: usize, packets_per_thread: u64) -> Run {
    use std::sync::Barrier;
    let threads = threads.max(1);
    let cpus = crate::engine::allowed_cpus();
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let cpu = cpus.get(t % cpus.len().max(1)).copied();
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    crate::engine::pin_to(cpu);
                }
                start.wait();
                let run = run_baseline(s, packets_per_thread);
                (run.delivered, Instant::now())
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let (mut delivered, mut end) = (0, t0);
    for h in handles {
        if let Ok((d, e)) = h.join() {
            delivered += d;
            end = end.max(e);
        }
    }
    Run {
        generated: packets_per_thread * threads as u64,
        delivered,
        seconds: end.duration_since(t0).as_secs_f64(),
    }
}

/// The peer: the same generator straight into the same sink, batch by batch.
pub fn run_baseline(s: Scenario, packets: u64) -> Run {
    let (_, frames) = scenario(s);
    let mut generator = MemPort::generator("gen", frames, packets);
    let mut sink = MemPort::sink("sink");
    let delivered = sink.counters();
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::default()).collect();
    let start = Instant::now();
    loop {
        let n = generator.rx_batch(&mut bufs).unwrap_or(0);
        if n == 0 {
            break;
        }
        let _ = sink.tx_batch(bufs.get(..n).unwrap_or(&[]));
    }
    let seconds = start.elapsed().as_secs_f64();
    Run {
        generated: packets,
        delivered: delivered.packets.load(Ordering::Relaxed),
        seconds,
    }
}

/// Host A's state and frames, host B's state and frames.
pub type OverlayHosts = (DesiredState, Vec<Vec<u8>>, DesiredState, Vec<Vec<u8>>);

/// The two hosts of the overlay benchmark: host A (198.18.0.1) with the
/// sender on `gen` and the underlay on `sink`; host B (198.18.0.2) with the
/// underlay on `gen` and `hosts` receivers on `sink`. Switch `a` (VNI 100)
/// spans both. Returns A's state and frames (to B's ports: encapsulated),
/// and B's state and frames (what A sends: decapsulated to its ports).
pub fn overlay_scenario(
    hosts: u32,
    encap: crate::overlay::Encapsulation,
) -> Result<OverlayHosts, crate::config::ConfigError> {
    use crate::overlay::{EndpointSpec, OverlaySpec, OverlaySwitchSpec, RemotePortSpec};
    let (base, frames) = scenario(Scenario::L2 { macs: hosts });
    let ends = [
        ("198.18.0.1", "02:00:00:00:aa:01"),
        ("198.18.0.2", "02:00:00:00:aa:02"),
    ];
    let host = |me: usize, underlay: &str, local: &dyn Fn(&PortSpec) -> bool| {
        let other = 1 - me;
        let mut state = DesiredState {
            ports: Vec::new(),
            ..base.clone()
        };
        let mut remote_ports = Vec::new();
        for p in &base.ports {
            if local(p) {
                state.ports.push(p.clone());
            } else {
                remote_ports.push(RemotePortSpec {
                    name: p.name.clone(),
                    switch: p.switch.clone(),
                    endpoint: ends[other].0.into(),
                    mac: p.mac.clone().unwrap_or_default(),
                    ips: p.ips.clone(),
                });
            }
        }
        state.overlay = Some(Box::new(OverlaySpec {
            interface: underlay.into(),
            local_ip: ends[me].0.into(),
            local_mac: ends[me].1.into(),
            encapsulation: encap,
            mtu: 1500,
            switches: vec![OverlaySwitchSpec {
                switch: "a".into(),
                vni: 100,
            }],
            endpoints: vec![EndpointSpec {
                ip: ends[other].0.into(),
                mac: ends[other].1.into(),
            }],
            remote_ports,
        }));
        state
    };
    let a = host(0, "sink", &|p: &PortSpec| p.name == "src");
    let mut b = host(1, "gen", &|p: &PortSpec| p.name != "src");
    for p in &mut b.ports {
        p.interface = "sink".into();
    }
    // What A puts on the wire: its own header in front of each frame.
    let ta = crate::config::compile(&a, &interfaces(), 1)?;
    let encapsulated = frames
        .iter()
        .filter_map(|f| {
            let mut buf = f.clone();
            buf.resize(crate::port::BUF_SIZE, 0);
            let mut len = f.len();
            let d = crate::pipeline::process(
                &ta,
                &mut crate::pipeline::Learned::new(0),
                0,
                &mut buf,
                &mut len,
                &mut crate::pipeline::NoTrace,
            );
            let crate::pipeline::Verdict::Tunnel {
                endpoint,
                vni,
                entropy,
            } = d.verdict
            else {
                return None;
            };
            let h = ta.overlay.as_ref()?.header(endpoint, vni, entropy, len)?;
            let mut out = h.to_vec();
            out.extend_from_slice(buf.get(..len)?);
            Some(out)
        })
        .collect();
    Ok((a, frames, b, encapsulated))
}

/// The time-stamp counter (x86_64), for cycles per packet.
fn tsc() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions and reads no memory.
        Some(unsafe { std::arch::x86_64::_rdtsc() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Overlay encap + decap on one core: generator → worker (host A: switch,
/// encapsulate) → sink, then generator (A's encapsulated frames) → worker
/// (host B: decapsulate, switch) → sink; the run covers both halves
/// (delivered = frames B delivered). Also returns TSC cycles per packet.
pub fn run_overlay(
    hosts: u32,
    encap: crate::overlay::Encapsulation,
    packets: u64,
) -> Result<(Run, Option<f64>), crate::config::ConfigError> {
    let (a, frames_a, b, frames_b) = overlay_scenario(hosts, encap)?;
    let mut seconds = 0.0;
    let mut cycles = Some(0u64);
    let mut delivered = u64::MAX;
    for (state, frames) in [(a, frames_a), (b, frames_b)] {
        let config = ConfigHandle::new(interfaces());
        config.apply(state)?;
        let sink = MemPort::sink("sink");
        let counted = sink.counters();
        let ports: Vec<Box<dyn Port>> = vec![
            Box::new(MemPort::generator("gen", frames, packets)),
            Box::new(sink),
        ];
        let mut worker = Worker::new(ports, config.tables(), Arc::new(Stats::new(&interfaces())));
        let c0 = tsc();
        let start = Instant::now();
        while worker.poll_once() > 0 {}
        seconds += start.elapsed().as_secs_f64();
        cycles = match (cycles, c0, tsc()) {
            (Some(c), Some(s), Some(e)) => Some(c + e.saturating_sub(s)),
            _ => None,
        };
        // Both halves must deliver: the run counts the lesser.
        delivered = delivered.min(counted.packets.load(Ordering::Relaxed));
    }
    let run = Run {
        generated: packets,
        delivered,
        seconds,
    };
    Ok((run, cycles.map(|c| c as f64 / delivered.max(1) as f64)))
}

/// The overlay benchmark's peer: the same frames switched locally on each
/// host (two passes of L2 switching, no tunnel), timed the same way.
pub fn run_overlay_peer(
    hosts: u32,
    packets: u64,
) -> Result<(Run, Option<f64>), crate::config::ConfigError> {
    let mut total = Run {
        generated: packets,
        delivered: 0,
        seconds: 0.0,
    };
    let mut cycles = Some(0u64);
    for _ in 0..2 {
        let c0 = tsc();
        let r = run_pipeline(Scenario::L2 { macs: hosts }, packets)?;
        cycles = match (cycles, c0, tsc()) {
            (Some(c), Some(s), Some(e)) => Some(c + e.saturating_sub(s)),
            _ => None,
        };
        total.seconds += r.seconds;
        total.delivered = r.delivered;
    }
    Ok((
        total,
        cycles.map(|c| c as f64 / total.delivered.max(1) as f64),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_scenario_encapsulates_and_delivers_every_packet() {
        for encap in [
            crate::overlay::Encapsulation::Geneve,
            crate::overlay::Encapsulation::Vxlan,
        ] {
            let (_, frames_a, _, frames_b) = overlay_scenario(256, encap).unwrap();
            assert_eq!(
                frames_a.len(),
                frames_b.len(),
                "every frame is encapsulated"
            );
            assert!(frames_b.iter().all(|f| f.len() == 60 + 50));
            let (run, cycles) = run_overlay(256, encap, 20_000).unwrap();
            assert_eq!(
                (run.generated, run.delivered),
                (20_000, 20_000),
                "{encap:?}"
            );
            assert!(cycles.is_none_or(|c| c > 0.0));
            let (peer, _) = run_overlay_peer(256, 20_000).unwrap();
            assert_eq!(peer.delivered, 20_000);
        }
    }

    #[test]
    fn every_scenario_delivers_every_packet() {
        for s in [
            Scenario::L2 { macs: 1 },
            Scenario::L2 { macs: 10_000 },
            Scenario::Routed { hosts: 256 },
        ] {
            let run = run_pipeline(s, 20_000).unwrap();
            assert_eq!((run.generated, run.delivered), (20_000, 20_000), "{s:?}");
            let peer = run_baseline(s, 20_000);
            assert_eq!(peer.delivered, 20_000, "{s:?}");
        }
    }

    #[test]
    fn worker_scenarios_deliver_every_packet() {
        let s = Scenario::Routed { hosts: 256 };
        for (workers, feed) in [(1, Feed::Steered), (2, Feed::Steered), (2, Feed::Mixed)] {
            let (run, lane_full) = run_workers(s, workers, 10_000, feed).unwrap();
            // Lanes may overflow when one thread outruns the other (counted
            // drops, like a full NIC ring); nothing else is lost.
            assert_eq!(
                (run.generated, run.delivered + lane_full),
                (10_000 * workers as u64, 10_000 * workers as u64),
                "{workers} {feed:?}"
            );
            if feed == Feed::Steered {
                assert_eq!(lane_full, 0);
            }
        }
        let control = run_baseline_threads(s, 2, 10_000);
        assert_eq!((control.generated, control.delivered), (20_000, 20_000));
    }

    #[test]
    fn service_scenarios_deliver_every_packet_on_and_off() {
        for s in [
            Service::Meter,
            Service::Mirror,
            Service::Nat64,
            Service::Policy,
        ] {
            for enabled in [true, false] {
                let (run, mirrored) = run_service(s, enabled, 6_000).unwrap();
                assert_eq!(run.delivered, 6_000, "{s:?} enabled={enabled}");
                let copies = if enabled && s == Service::Mirror {
                    6_000
                } else {
                    0
                };
                assert_eq!(mirrored, copies, "{s:?} enabled={enabled}");
            }
        }
    }

    #[test]
    fn stateful_scenarios_deliver_every_packet_on_and_off() {
        for s in [
            Stateful::SecurityGroups {
                hosts: 16,
                rules: 100,
                flows: 2_000,
            },
            Stateful::SecurityGroupSets {
                hosts: 16,
                prefixes: 1000,
                flows: 2_000,
            },
            Stateful::Snat { flows: 2_000 },
            Stateful::Lb4 {
                members: 16,
                flows: 2_000,
            },
        ] {
            for enabled in [true, false] {
                let (run, bytes) = run_stateful(s, enabled, 6_000).unwrap();
                assert_eq!(run.delivered, 6_000, "{s:?} enabled={enabled}");
                assert!(bytes > 0);
            }
        }
        // The load balancer really translates: the VIP frame leaves DNATed
        // to a member's port.
        let (state, frames) = stateful_scenario(
            Stateful::Lb4 {
                members: 4,
                flows: 1,
            },
            true,
        );
        let t = crate::config::compile(&state, &interfaces(), 1).unwrap();
        let mut buf = vec![0u8; 2048];
        buf[..frames[0].len()].copy_from_slice(&frames[0]);
        let mut len = frames[0].len();
        let mut learned = crate::pipeline::Learned::new(0).with_connections(16);
        let v = crate::pipeline::process(
            &t,
            &mut learned,
            0,
            &mut buf,
            &mut len,
            &mut crate::pipeline::NoTrace,
        )
        .verdict;
        assert_eq!(v, crate::pipeline::Verdict::Unicast { port: 1 });
        assert_eq!(u16::from_be_bytes([buf[36], buf[37]]), 5353);
        assert_eq!(buf[30..32], [10, 1]);
        // The rules are really evaluated: with the allowing rule moved to
        // another port, the same frame is dropped.
        let s = Stateful::SecurityGroups {
            hosts: 1,
            rules: 3,
            flows: 1,
        };
        let (mut state, frames) = stateful_scenario(s, true);
        let verdict = |state: &DesiredState| {
            let t = crate::config::compile(state, &interfaces(), 1).unwrap();
            let mut buf = vec![0u8; 2048];
            buf[..frames[0].len()].copy_from_slice(&frames[0]);
            let mut len = frames[0].len();
            crate::pipeline::process(
                &t,
                &mut crate::pipeline::Learned::new(0),
                0,
                &mut buf,
                &mut len,
                &mut crate::pipeline::NoTrace,
            )
            .verdict
        };
        assert_eq!(
            verdict(&state),
            crate::pipeline::Verdict::Unicast { port: 1 }
        );
        state.security_groups[0].rules.last_mut().unwrap().port_min = Some(54);
        assert_eq!(
            verdict(&state),
            crate::pipeline::Verdict::Drop(crate::counters::DropReason::SecurityGroupDenied)
        );
        // The set scenario too, both ways: without the sender's prefix (the
        // set's, or the expansion's last rule) the frame is dropped.
        for sets in [true, false] {
            let s = Stateful::SecurityGroupSets {
                hosts: 1,
                prefixes: 10,
                flows: 1,
            };
            let (mut state, _) = stateful_scenario(s, sets);
            assert_eq!(
                verdict(&state),
                crate::pipeline::Verdict::Unicast { port: 1 },
                "sets={sets}"
            );
            if sets {
                state.address_groups[0].addresses.pop();
            } else {
                state.security_groups[0].rules.pop();
            }
            assert_eq!(
                verdict(&state),
                crate::pipeline::Verdict::Drop(crate::counters::DropReason::SecurityGroupDenied),
                "sets={sets}"
            );
        }
    }
}
