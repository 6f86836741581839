//! The overlay between two hosts: two data planes, each in its own "host"
//! namespace with its VMs on veths `dpN`, joined by an underlay veth pair
//! (`ul0` on each side, tunnel endpoints 198.18.0.1 and 198.18.0.2, MTU
//! 1500). Switch `a` (10.0.1.0/24, fd00:1::/64, VNI 100) has vm_a0 on host
//! A and vm_b0 on host B; switch `b` (10.0.2.0/24, fd00:2::/64, VNI 200)
//! has vm_b1 on host B; router `r` (distributed: on both hosts) joins them.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use keel_dataplane::control::{request, Request, Response};
use keel_dataplane::counters::StatsSnapshot;
use keel_dataplane::model::{DesiredState, PortSpec, SwitchSpec};
use keel_dataplane::overlay::{
    Encapsulation, EndpointSpec, OverlaySpec, OverlaySwitchSpec, RemotePortSpec,
};
use keel_testkit::{veth_pair, NetnsHost};

mod common;

use common::{bin, in_netns};

/// (name, host index, switch, MAC, IPv4/len, IPv6, IPv4 gateway, IPv6 gateway)
type VmRow = (
    &'static str,
    usize,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);
const VMS: [VmRow; 3] = [
    (
        "vm_a0",
        0,
        "a",
        "02:00:00:00:01:10",
        "10.0.1.10/24",
        "fd00:1::10",
        "10.0.1.1",
        "fd00:1::1",
    ),
    (
        "vm_b0",
        1,
        "a",
        "02:00:00:00:01:20",
        "10.0.1.20/24",
        "fd00:1::20",
        "10.0.1.1",
        "fd00:1::1",
    ),
    (
        "vm_b1",
        1,
        "b",
        "02:00:00:00:02:20",
        "10.0.2.20/24",
        "fd00:2::20",
        "10.0.2.1",
        "fd00:2::1",
    ),
];

/// (tunnel endpoint, underlay MAC) per host.
const HOSTS: [(&str, &str); 2] = [
    ("198.18.0.1", "02:00:00:00:aa:01"),
    ("198.18.0.2", "02:00:00:00:aa:02"),
];

fn ip4(i: usize) -> &'static str {
    VMS[i].4.split('/').next().unwrap()
}

/// The desired state of host `h`: the same logical topology everywhere,
/// its own VMs as local ports, the others as remote ports.
fn desired(h: usize, encap: Encapsulation) -> DesiredState {
    let switch = |name: &str, n: u8| SwitchSpec {
        name: name.into(),
        subnet: format!("10.0.{n}.0/24"),
        vlan: None,
        subnet6: Some(format!("fd00:{n}::/64")),
        dhcp: None,
    };
    let mut ports = Vec::new();
    let mut remote_ports = Vec::new();
    let mut local = 0;
    for (name, host, sw, mac, cidr, ip6, _, _) in VMS {
        let ips = vec![cidr.split('/').next().unwrap().to_string(), ip6.to_string()];
        if host == h {
            ports.push(PortSpec {
                name: name.into(),
                switch: sw.into(),
                interface: format!("dp{local}"),
                mac: Some(mac.into()),
                ips,
                port_security: true,
            });
            local += 1;
        } else {
            remote_ports.push(RemotePortSpec {
                name: name.into(),
                switch: sw.into(),
                endpoint: HOSTS[host].0.into(),
                mac: mac.into(),
                ips,
            });
        }
    }
    let other = 1 - h;
    DesiredState {
        switches: vec![switch("a", 1), switch("b", 2)],
        ports,
        routers: vec![common::router_ab()],
        overlay: Some(Box::new(OverlaySpec {
            interface: "ul0".into(),
            local_ip: HOSTS[h].0.into(),
            local_mac: HOSTS[h].1.into(),
            encapsulation: encap,
            mtu: 1500,
            switches: vec![
                OverlaySwitchSpec {
                    switch: "a".into(),
                    vni: 100,
                },
                OverlaySwitchSpec {
                    switch: "b".into(),
                    vni: 200,
                },
            ],
            endpoints: vec![EndpointSpec {
                ip: HOSTS[other].0.into(),
                mac: HOSTS[other].1.into(),
            }],
            remote_ports,
        })),
        ..DesiredState::default()
    }
}

/// One "host": a namespace running a data plane.
struct DpHost {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    ns: NetnsHost,
}

struct Lab {
    // Dropped first: the VMs, then the hosts (killing the data planes).
    vms: Vec<NetnsHost>,
    hosts: Vec<DpHost>,
}

impl Lab {
    fn start(encap: Encapsulation) -> Lab {
        Lab::start_with(encap, 1)
    }

    /// [`Lab::start`] with `workers` data-plane workers per host.
    fn start_with(encap: Encapsulation, workers: usize) -> Lab {
        let host_ns: Vec<NetnsHost> = (0..2)
            .map(|h| NetnsHost::new(&format!("ovh{h}")).unwrap())
            .collect();
        let mut vms = Vec::new();
        let mut local = [0usize; 2];
        for (name, h, _, mac, cidr, ip6, gw, gw6) in VMS {
            let vm = NetnsHost::new(name).unwrap();
            let dp = format!("dp{}", local[h]);
            local[h] += 1;
            let host = &host_ns[h];
            veth_pair(host, &dp, &vm, "eth0").unwrap();
            vm.ip(&["link", "set", "eth0", "address", mac]).unwrap();
            vm.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])
                .unwrap();
            vm.add_addr("eth0", cidr).unwrap();
            vm.add_route("default", gw).unwrap();
            vm.ip(&["-6", "route", "add", "default", "via", gw6])
                .unwrap();
            // veth pitfall: no CHECKSUM_PARTIAL frames (no PACKET_VNET_HDR).
            vm.exec(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
            host.exec(&["ethtool", "-K", &dp, "tx", "off"]).unwrap();
            host.sh(&format!("sysctl -qw net.ipv6.conf.{dp}.disable_ipv6=1"))
                .unwrap();
            vms.push(vm);
        }
        veth_pair(&host_ns[0], "ul0", &host_ns[1], "ul0").unwrap();
        for (h, ns) in host_ns.iter().enumerate() {
            ns.ip(&["link", "set", "ul0", "address", HOSTS[h].1])
                .unwrap();
            ns.exec(&["ethtool", "-K", "ul0", "tx", "off"]).unwrap();
            ns.sh("sysctl -qw net.ipv6.conf.ul0.disable_ipv6=1")
                .unwrap();
        }
        let mut hosts = Vec::new();
        for (h, ns) in host_ns.into_iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("state.json");
            std::fs::write(&config, serde_json::to_vec(&desired(h, encap)).unwrap()).unwrap();
            let socket = dir.path().join("dp.sock");
            let mut args = vec![bin().to_string()];
            for i in 0..local[h] {
                args.extend(["--interface".into(), format!("dp{i}")]);
            }
            args.extend([
                "--interface".into(),
                "ul0".into(),
                "--config".into(),
                config.display().to_string(),
                "--socket".into(),
                socket.display().to_string(),
                "--workers".into(),
                workers.to_string(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ns.spawn(&args).unwrap();
            hosts.push(DpHost {
                socket,
                _dir: dir,
                ns,
            });
        }
        let lab = Lab { vms, hosts };
        for h in &lab.hosts {
            common::wait_up(&h.socket);
        }
        lab
    }

    fn stats_now(&self, h: usize) -> StatsSnapshot {
        match request(&self.hosts[h].socket, &Request::Stats).unwrap() {
            Response::Stats { stats } => stats,
            other => panic!("{other:?}"),
        }
    }

    /// Counters once they settle (a worker folds after each round).
    fn stats(&self, h: usize) -> StatsSnapshot {
        let mut last = self.stats_now(h);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.stats_now(h);
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    fn ping(&self, from: usize, to: &str) -> String {
        let v6 = if to.contains(':') { "-6 " } else { "" };
        self.vms[from]
            .sh(&format!("ping {v6}-c 3 -i 0.2 -W 2 {to}"))
            .unwrap()
    }

    /// 1 MiB over TCP from vm `from` to vm `to` at `addr`, checked end to end.
    fn tcp(&self, from: usize, to: usize, addr: &str) {
        let bind = if addr.contains(':') {
            "[::]:5000"
        } else {
            "0.0.0.0:5000"
        };
        let listener = in_netns(self.vms[to].name(), || TcpListener::bind(bind).unwrap());
        let addr: std::net::SocketAddr = if addr.contains(':') {
            format!("[{addr}]:5000").parse().unwrap()
        } else {
            format!("{addr}:5000").parse().unwrap()
        };
        let mut client = in_netns(self.vms[from].name(), || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap()
        });
        let (mut server, _) = listener.accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got == data, "received {} bytes, content differs", got.len());
    }
}

fn outcome(s: &StatsSnapshot, name: &str) -> u64 {
    s.outcomes.get(name).copied().unwrap_or(0)
}

fn drops(s: &StatsSnapshot, port: &str, reason: &str) -> u64 {
    s.port(port)
        .and_then(|p| p.drops.get(reason).copied())
        .unwrap_or(0)
}

fn same_subnet_and_routed(lab: &Lab) {
    // Same subnet over the tunnel: switched on A, encapsulated, decapsulated on B.
    let out = lab.ping(0, ip4(1));
    assert!(out.contains("3 received"), "{out}");
    assert!(
        out.contains("ttl=64"),
        "switching must not touch TTL: {out}"
    );
    let out = lab.ping(0, VMS[1].5);
    assert!(out.contains("3 received"), "{out}");
    // Routed on the source host, then encapsulated with the destination switch's VNI.
    let out = lab.ping(0, ip4(2));
    assert!(out.contains("3 received"), "{out}");
    assert!(
        out.contains("ttl=63"),
        "routed once, on the sender's host: {out}"
    );
    let out = lab.ping(0, VMS[2].5);
    assert!(out.contains("3 received"), "{out}");
    assert!(out.contains("ttl=63"), "{out}");
    // TCP, IPv4 and IPv6, same subnet and routed; full-size segments need
    // path MTU discovery through the data plane's ICMP errors (MTU 1450).
    lab.tcp(0, 1, ip4(1));
    lab.tcp(1, 0, VMS[0].5);
    lab.tcp(0, 2, ip4(2));
    lab.tcp(2, 0, VMS[0].5);

    let a = lab.stats(0);
    let b = lab.stats(1);
    for s in [&a, &b] {
        assert!(outcome(s, "overlay_encap") > 100, "{s:?}");
        assert!(outcome(s, "overlay_decap") > 100, "{s:?}");
        assert_eq!(drops(s, "ul0", "overlay_malformed"), 0, "{s:?}");
        assert_eq!(drops(s, "ul0", "overlay_unknown_vni"), 0, "{s:?}");
    }
    assert!(outcome(&a, "routed") >= 6, "{a:?}");
    // Full-size TCP segments were answered, not dropped: A's senders got
    // "fragmentation needed", B's IPv6 senders "packet too big".
    assert!(outcome(&a, "icmp_frag_needed_sent") >= 1, "{a:?}");
    assert!(outcome(&b, "icmp6_packet_too_big_sent") >= 1, "{b:?}");
    assert!(outcome(&b, "routed") >= 6, "{b:?}");
    // Each host routes its own senders' packets, never what came out of the tunnel.
    assert_eq!(drops(&a, "ul0", "overlay_loop"), 0, "{a:?}");
    assert_eq!(drops(&b, "ul0", "overlay_loop"), 0, "{b:?}");
}

#[test]
fn geneve_two_hosts_switched_and_routed_ipv4_ipv6() {
    let lab = Lab::start(Encapsulation::Geneve);
    same_subnet_and_routed(&lab);
    // A trace shows the encapsulation: VNI and remote endpoint.
    let resp = request(
        &lab.hosts[0].socket,
        &Request::Trace {
            interface: "dp0".into(),
            frame_hex: None,
            packet: serde_json::from_value(serde_json::json!({
                "eth_src": VMS[0].3, "eth_dst": VMS[1].3,
                "ip_src": ip4(0), "ip_dst": ip4(1)
            }))
            .unwrap(),
        },
    )
    .unwrap();
    let text = format!("{resp:?}");
    assert!(text.contains("overlay_encap"), "{text}");
    assert!(text.contains("VNI 100"), "{text}");
    assert!(text.contains("198.18.0.2"), "{text}");
}

/// Two workers per host: tunnel frames are steered by their inner flow,
/// so each connection's two directions meet on one worker. Host B's VMs
/// are in a security group admitting only TCP 5000 and ICMP: the replies
/// to their own connections (vm_b0 → vm_a0) come back through the tunnel
/// and pass only if they meet the connection's entry.
#[test]
fn geneve_two_hosts_with_two_workers() {
    use keel_dataplane::model::{EtherType, RuleDirection, SecurityGroupSpec, SecurityRuleSpec};
    let lab = Lab::start_with(Encapsulation::Geneve, 2);
    let rule = |ethertype: EtherType, protocol: &str, port: Option<u16>| SecurityRuleSpec {
        direction: RuleDirection::Ingress,
        ethertype,
        protocol: Some(protocol.into()),
        port_min: port,
        port_max: port,
        icmp_type: None,
        icmp_code: None,
        remote_cidr: None,
        remote_group: None,
        remote_address_group: None,
        port_set: None,
        priority: 0,
        action: Default::default(),
    };
    let mut state = desired(1, Encapsulation::Geneve);
    state.security_groups.push(SecurityGroupSpec {
        name: "b".into(),
        ports: vec!["vm_b0".into(), "vm_b1".into()],
        rules: vec![
            rule(EtherType::Ipv4, "tcp", Some(5000)),
            rule(EtherType::Ipv4, "icmp", None),
            rule(EtherType::Ipv6, "tcp", Some(5000)),
            rule(EtherType::Ipv6, "icmpv6", None),
        ],
    });
    match request(&lab.hosts[1].socket, &Request::Apply { state }).unwrap() {
        Response::Applied { .. } => {}
        other => panic!("{other:?}"),
    }
    same_subnet_and_routed(&lab);
    for h in 0..2 {
        let s = lab.stats(h);
        assert_eq!(s.workers.len(), 2, "{s:?}");
        assert!(s.workers.iter().all(|w| w["processed"] > 0), "{s:?}");
    }
    let b = lab.stats(1);
    assert_eq!(drops(&b, "ul0", "security_group_denied"), 0, "{b:?}");
    assert_eq!(drops(&b, "ul0", "ct_invalid"), 0, "{b:?}");
}

#[test]
fn vxlan_two_hosts_switched_and_routed_ipv4_ipv6() {
    let lab = Lab::start(Encapsulation::Vxlan);
    same_subnet_and_routed(&lab);
}

#[test]
fn too_big_for_the_underlay_is_answered_with_fragmentation_needed() {
    let lab = Lab::start(Encapsulation::Geneve);
    // 1472 + 28 = 1500-byte packet with DF: 1550 bytes once encapsulated.
    let r = lab.vms[0]
        .capture(&[
            "ping",
            "-M",
            "do",
            "-s",
            "1472",
            "-c",
            "2",
            "-W",
            "2",
            ip4(1),
        ])
        .unwrap();
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(!r.success, "{text}");
    assert!(
        text.contains("mtu = 1450") || text.contains("mtu=1450"),
        "{text}"
    );
    // The allowed size passes: 1422 + 28 = 1450.
    let out = lab.vms[0]
        .sh(&format!("ping -M do -s 1422 -c 2 -W 2 {}", ip4(1)))
        .unwrap();
    assert!(out.contains("2 received"), "{out}");
    // IPv6: packet too big, MTU 1450; then 1402 + 48 = 1450 passes.
    let r = lab.vms[0]
        .capture(&[
            "ping", "-6", "-M", "do", "-s", "1452", "-c", "2", "-W", "2", VMS[1].5,
        ])
        .unwrap();
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(
        text.contains("mtu = 1450") || text.contains("mtu=1450"),
        "{text}"
    );
    let out = lab.vms[0]
        .sh(&format!("ping -6 -M do -s 1402 -c 2 -W 2 {}", VMS[1].5))
        .unwrap();
    assert!(out.contains("2 received"), "{out}");
    let a = lab.stats(0);
    assert!(outcome(&a, "icmp_frag_needed_sent") >= 1, "{a:?}");
    assert!(outcome(&a, "icmp6_packet_too_big_sent") >= 1, "{a:?}");
}

#[test]
fn invalid_overlay_is_rejected_and_the_running_state_stays() {
    let lab = Lab::start(Encapsulation::Geneve);
    let apply = |state: DesiredState| match request(&lab.hosts[0].socket, &Request::Apply { state })
        .unwrap()
    {
        Response::Error { message } => message,
        other => panic!("{other:?}"),
    };
    let mut s = desired(0, Encapsulation::Geneve);
    s.overlay.as_mut().unwrap().switches[1].vni = 100;
    let e = apply(s);
    assert!(e.contains("VNI 100 is used by switches"), "{e}");
    let mut s = desired(0, Encapsulation::Geneve);
    s.overlay.as_mut().unwrap().switches[0].vni = 1 << 24;
    let e = apply(s);
    assert!(e.contains("above 16777215"), "{e}");
    let mut s = desired(0, Encapsulation::Geneve);
    s.overlay.as_mut().unwrap().interface = "nope".into();
    let e = apply(s);
    assert!(e.contains("unknown underlay interface"), "{e}");
    // Still forwarding on the running tables.
    let out = lab.ping(0, ip4(1));
    assert!(out.contains("3 received"), "{out}");
    let _ = &lab.hosts[1].ns;
}
