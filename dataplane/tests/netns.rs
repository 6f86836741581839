//! The data plane forwarding between real network namespaces.
//!
//! Topology: a "switch" namespace runs `keel-dataplane` on veths `dpN`; each
//! "VM" namespace holds the other end as `eth0` (TX checksum offload off, see
//! the crate docs). Switch `a` (10.0.1.0/24) has vm0, vm1, vm3; switch `b`
//! (10.0.2.0/24) has vm2; router `r` joins them.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_dataplane::control::{request, Request, Response};
use keel_dataplane::counters::StatsSnapshot;
use keel_dataplane::model::{DesiredState, PortSpec, SwitchSpec};
use keel_testkit::{veth_pair, NetnsHost};

struct Vm {
    host: NetnsHost,
    ip: &'static str,
}

mod common;

use common::{bin, in_netns, wait_for};

struct Lab {
    vms: Vec<Vm>,
    socket: PathBuf,
    dir: tempfile::TempDir,
    // Dropped last: kills the data plane, then removes the namespaces.
    _switch: NetnsHost,
}

const VMS: [(&str, &str, &str, &str); 4] = [
    // (switch, MAC, IP/len, gateway)
    ("a", "02:00:00:00:00:10", "10.0.1.10/24", "10.0.1.1"),
    ("a", "02:00:00:00:00:11", "10.0.1.11/24", "10.0.1.1"),
    ("b", "02:00:00:00:00:20", "10.0.2.10/24", "10.0.2.1"),
    ("a", "02:00:00:00:00:12", "10.0.1.12/24", "10.0.1.1"),
];

/// VM `i`'s IPv6 address: `fd00:<1 for a, 2 for b>::1<i>`.
fn ip6_of(switch: &str, i: usize) -> String {
    format!("fd00:{}::1{i}", if switch == "b" { 2 } else { 1 })
}

fn desired() -> DesiredState {
    DesiredState {
        switches: vec![
            SwitchSpec {
                name: "a".into(),
                subnet: "10.0.1.0/24".into(),
                vlan: None,
                subnet6: Some("fd00:1::/64".into()),
                dhcp: None,
            },
            SwitchSpec {
                name: "b".into(),
                subnet: "10.0.2.0/24".into(),
                vlan: None,
                subnet6: Some("fd00:2::/64".into()),
                dhcp: None,
            },
        ],
        ports: VMS
            .iter()
            .enumerate()
            .map(|(i, (sw, mac, ip, _))| PortSpec {
                name: format!("vm{i}"),
                switch: (*sw).into(),
                interface: format!("dp{i}"),
                mac: Some((*mac).into()),
                ips: vec![ip.split('/').next().unwrap().into(), ip6_of(sw, i)],
                port_security: true,
            })
            .collect(),
        routers: vec![common::router_ab()],
        ..DesiredState::default()
    }
}

/// A TCP connection vm `from` → vm `to` port 5000: (client, server side).
fn tcp_pair(lab: &Lab, from: usize, to: usize) -> (TcpStream, TcpStream) {
    let listener = in_netns(lab.vm(to).name(), || {
        TcpListener::bind("0.0.0.0:5000").unwrap()
    });
    let addr = format!("{}:5000", lab.vms[to].ip);
    let client = in_netns(lab.vm(from).name(), || {
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(10)).unwrap()
    });
    let (server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    (client, server)
}

impl Lab {
    fn start() -> Lab {
        Lab::start_with(false)
    }

    /// `ipv6`: keep IPv6 on and give each VM `fd00:1::1<i>/64`.
    fn start_with(ipv6: bool) -> Lab {
        Lab::start_opts(ipv6, 1)
    }

    /// [`Lab::start_with`] with `workers` data-plane workers.
    fn start_opts(ipv6: bool, workers: usize) -> Lab {
        let switch = NetnsHost::new("dpsw").unwrap();
        let mut vms = Vec::new();
        for (i, (sw, mac, cidr, gw)) in VMS.iter().enumerate() {
            let host = NetnsHost::new(&format!("vm{i}")).unwrap();
            let dp = format!("dp{i}");
            veth_pair(&switch, &dp, &host, "eth0").unwrap();
            host.ip(&["link", "set", "eth0", "address", mac]).unwrap();
            if ipv6 {
                let addr = format!("{}/64", ip6_of(sw, i));
                host.ip(&["addr", "add", &addr, "dev", "eth0", "nodad"])
                    .unwrap();
            } else {
                // No IPv6 chatter (RS/MLD floods would muddy the capture checks).
                host.sh(
                    "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1",
                )
                .unwrap();
            }
            host.add_addr("eth0", cidr).unwrap();
            host.add_route("default", gw).unwrap();
            // veth pitfall: we do not handle CHECKSUM_PARTIAL frames (no PACKET_VNET_HDR).
            host.exec(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
            switch.exec(&["ethtool", "-K", &dp, "tx", "off"]).unwrap();
            if !ipv6 {
                switch
                    .sh(&format!("sysctl -qw net.ipv6.conf.{dp}.disable_ipv6=1"))
                    .unwrap();
            }
            vms.push(Vm {
                host,
                ip: cidr.split('/').next().unwrap(),
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("state.json");
        std::fs::write(&config, serde_json::to_vec(&desired()).unwrap()).unwrap();
        let socket = dir.path().join("dp.sock");
        let mut args = vec![bin().to_string()];
        for i in 0..VMS.len() {
            args.extend(["--interface".into(), format!("dp{i}")]);
        }
        args.extend([
            "--config".into(),
            config.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--workers".into(),
            workers.to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        switch.spawn(&args).unwrap();
        let lab = Lab {
            vms,
            socket,
            dir,
            _switch: switch,
        };
        common::wait_up(&lab.socket);
        lab
    }

    fn vm(&self, i: usize) -> &NetnsHost {
        &self.vms[i].host
    }

    fn stats_now(&self) -> StatsSnapshot {
        match request(&self.socket, &Request::Stats).unwrap() {
            Response::Stats { stats } => stats,
            other => panic!("{other:?}"),
        }
    }

    /// Counters once they settle: a worker folds its counts after each round,
    /// so a snapshot taken right after the last packet (on a busy machine,
    /// with the worker preempted) may still miss that round.
    fn stats(&self) -> StatsSnapshot {
        let mut last = self.stats_now();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.stats_now();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    fn ping(&self, from: usize, to: &str) -> String {
        self.vm(from)
            .sh(&format!("ping -c 3 -i 0.2 -W 2 {to}"))
            .unwrap()
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Switching, ARP suppression and routing with two workers: frames of one
/// flow may arrive on either worker's socket and are steered to one.
#[test]
fn switching_arp_and_routing_with_two_workers() {
    let lab = Lab::start_opts(false, 2);
    same_subnet_ping_and_tcp_on(&lab);
    router_forwards_across_subnets_decrementing_ttl_on(&lab);
    arp_for_known_binding_is_answered_without_flooding_on(&lab);
    let stats = lab.stats();
    assert_eq!(stats.workers.len(), 2, "{stats:?}");
    assert!(
        stats.workers.iter().all(|w| w["processed"] > 0),
        "{stats:?}"
    );
}

#[test]
fn same_subnet_ping_and_tcp() {
    same_subnet_ping_and_tcp_on(&Lab::start());
}

fn same_subnet_ping_and_tcp_on(lab: &Lab) {
    let out = lab.ping(0, lab.vms[1].ip);
    assert!(out.contains("3 received"), "{out}");
    assert!(
        out.contains("ttl=64"),
        "switching must not touch TTL: {out}"
    );

    // TCP: 1 MiB from a real socket in vm0 to one in vm1, checked end to end.
    let (mut client, mut server) = tcp_pair(lab, 0, 1);
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
    assert!(
        got == data,
        "received {} bytes, content differs or short",
        got.len()
    );
    let stats = lab.stats();
    assert!(stats.port("dp0").unwrap().rx_packets > 100, "{stats:?}");
    assert!(stats.outcomes["l2_unicast"] > 100, "{stats:?}");
}

#[test]
fn router_forwards_across_subnets_decrementing_ttl() {
    router_forwards_across_subnets_decrementing_ttl_on(&Lab::start());
}

fn router_forwards_across_subnets_decrementing_ttl_on(lab: &Lab) {
    let out = lab.ping(0, lab.vms[2].ip);
    assert!(out.contains("3 received"), "{out}");
    // vm2 replies with TTL 64; the router takes one off on the way back.
    assert!(out.contains("ttl=63"), "{out}");
    // The gateway answers pings itself.
    let out = lab.ping(0, "10.0.1.1");
    assert!(out.contains("3 received"), "{out}");
    // TTL 1 expires at the router: ping reports time exceeded from the gateway.
    let r = lab
        .vm(0)
        .capture(&["ping", "-c", "1", "-t", "1", "-W", "2", lab.vms[2].ip])
        .unwrap();
    assert!(
        r.stdout.contains("10.0.1.1") && r.stdout.to_lowercase().contains("time to live exceeded"),
        "{r:?}"
    );
    // No route: net unreachable from the gateway.
    lab.vm(0)
        .ip(&["route", "add", "172.16.0.0/16", "via", "10.0.1.1"])
        .unwrap();
    let r = lab
        .vm(0)
        .capture(&["ping", "-c", "1", "-W", "2", "172.16.0.1"])
        .unwrap();
    assert!(
        r.stdout.contains("10.0.1.1") && r.stdout.contains("Unreachable"),
        "{r:?}"
    );
    let stats = lab.stats();
    assert!(stats.outcomes["routed"] >= 6, "{stats:?}");
    assert!(stats.outcomes["icmp_time_exceeded_sent"] >= 1, "{stats:?}");
    assert!(
        stats.outcomes["icmp_net_unreachable_sent"] >= 1,
        "{stats:?}"
    );
}

#[test]
fn spoofed_source_is_dropped_and_counted() {
    let lab = Lab::start();
    // An address vm0 does not own.
    lab.vm(0)
        .ip(&["addr", "add", "10.0.1.99/24", "dev", "eth0"])
        .unwrap();
    let r = lab
        .vm(0)
        .capture(&[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.0.1.99",
            lab.vms[1].ip,
        ])
        .unwrap();
    assert!(!r.success, "spoofed ping must fail: {r:?}");
    let stats = lab.stats();
    assert!(
        stats
            .port("dp0")
            .unwrap()
            .drops
            .get("spoofed_ip")
            .copied()
            .unwrap_or(0)
            >= 2,
        "{stats:?}"
    );
    // A foreign MAC.
    lab.vm(0)
        .ip(&["link", "set", "eth0", "address", "02:00:00:00:00:66"])
        .unwrap();
    let r = lab
        .vm(0)
        .capture(&["ping", "-c", "2", "-i", "0.2", "-W", "1", lab.vms[1].ip])
        .unwrap();
    assert!(!r.success, "{r:?}");
    let stats = lab.stats();
    assert!(
        stats
            .port("dp0")
            .unwrap()
            .drops
            .get("spoofed_mac")
            .copied()
            .unwrap_or(0)
            >= 1,
        "{stats:?}"
    );
    // The legitimate VM still works.
    let out = lab.ping(1, lab.vms[3].ip);
    assert!(out.contains("3 received"), "{out}");
}

#[test]
fn arp_for_known_binding_is_answered_without_flooding() {
    arp_for_known_binding_is_answered_without_flooding_on(&Lab::start());
}

fn arp_for_known_binding_is_answered_without_flooding_on(lab: &Lab) {
    let pcap = lab.dir().join("vm3.pcap");
    lab.vm(3)
        .spawn(&[
            "tcpdump",
            "-i",
            "eth0",
            "-n",
            "-U",
            "-w",
            &pcap.display().to_string(),
            "arp",
        ])
        .unwrap();
    wait_for(|| std::fs::metadata(&pcap).is_ok(), "tcpdump started");
    // Let tcpdump attach its filter (the file is created just before).
    std::thread::sleep(Duration::from_millis(500));
    let (before, vm1_tx) = {
        let s = lab.stats();
        (s.outcomes["arp_replied"], s.port("dp1").unwrap().tx_packets)
    };
    let out = lab
        .vm(0)
        .sh(&format!(
            "busybox arping -c 3 -w 3 -I eth0 {}",
            lab.vms[1].ip
        ))
        .unwrap();
    assert!(
        out.contains("02:00:00:00:00:11")
            || out.contains("02:00:00:00:00:11".to_uppercase().as_str()),
        "{out}"
    );
    let stats = lab.stats();
    assert!(stats.outcomes["arp_replied"] >= before + 3, "{stats:?}");
    // vm1 never saw the requests either: the data plane answered.
    assert_eq!(stats.port("dp1").unwrap().tx_packets, vm1_tx, "{stats:?}");
    // Control: an ARP for an unbound address is flooded and reaches vm3.
    let _ = lab.vm(0).capture(&[
        "busybox",
        "arping",
        "-c",
        "1",
        "-w",
        "1",
        "-I",
        "eth0",
        "10.0.1.77",
    ]);
    let dump = lab
        .vm(3)
        .sh(&format!(
            "sleep 0.5; tcpdump -n -r {} 2>/dev/null",
            pcap.display()
        ))
        .unwrap();
    assert!(
        !dump.contains(&format!("who-has {}", lab.vms[1].ip)),
        "request for a bound IP was flooded: {dump}"
    );
    assert!(
        dump.contains("who-has 10.0.1.77"),
        "capture saw nothing at all: {dump}"
    );
}

#[test]
fn config_changes_keep_tcp_alive_and_invalid_config_is_rejected() {
    let lab = Lab::start();
    let (mut client, mut server) = tcp_pair(&lab, 0, 1);
    // A stream that keeps flowing while the state is re-applied: the writer
    // sends 16 KiB chunks until told to stop, the reader checks every byte.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 16384];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (k, b) in chunk.iter_mut().enumerate() {
                    *b = ((sent + k as u64) % 251) as u8;
                }
                client.write_all(&chunk).unwrap();
                sent += chunk.len() as u64;
            }
            client.shutdown(std::net::Shutdown::Write).unwrap();
            sent
        })
    };
    let reader = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = server.read(&mut buf).unwrap();
            if n == 0 {
                return got;
            }
            for b in &buf[..n] {
                assert_eq!(*b, (got % 251) as u8, "corrupt byte at {got}");
                got += 1;
            }
        }
    });
    let mut state = desired();
    for round in 0..8 {
        state.switches.push(SwitchSpec {
            name: format!("extra{round}"),
            subnet: format!("10.9.{round}.0/24"),
            vlan: None,
            subnet6: None,
            dhcp: None,
        });
        match request(
            &lab.socket,
            &Request::Apply {
                state: state.clone(),
            },
        )
        .unwrap()
        {
            Response::Applied { .. } => {}
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // An invalid state (vm1 claims vm0's MAC) is rejected ...
    let mut bad = state.clone();
    bad.ports[1].mac = bad.ports[0].mac.clone();
    match request(&lab.socket, &Request::Apply { state: bad }).unwrap() {
        Response::Error { message } => assert!(message.contains("bound twice"), "{message}"),
        other => panic!("{other:?}"),
    }
    // The connection survived every change (and the rejected one): every
    // byte sent arrived, in order.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = writer.join().unwrap();
    let got = reader.join().unwrap();
    assert!(sent > 0);
    assert_eq!(got, sent);
    // ... and the previous state still forwards.
    match request(&lab.socket, &Request::Get).unwrap() {
        Response::State { state: s } => assert_eq!(s, state),
        other => panic!("{other:?}"),
    }
    let out = lab.ping(0, lab.vms[2].ip);
    assert!(out.contains("3 received"), "{out}");
}

#[test]
fn trace_over_the_socket() {
    let lab = Lab::start();
    let req: Request = serde_json::from_str(
        r#"{"op":"trace","interface":"dp0","packet":{"eth_src":"02:00:00:00:00:10","eth_dst":"02:00:00:00:ff:01","ip_src":"10.0.1.10","ip_dst":"10.0.2.10","protocol":"tcp"}}"#,
    )
    .unwrap();
    match request(&lab.socket, &req).unwrap() {
        Response::Trace { steps, verdict, .. } => {
            assert_eq!(verdict, "output to dp2");
            assert!(steps.iter().any(|s| s.stage == "router"), "{steps:?}");
        }
        other => panic!("{other:?}"),
    }
    // Tracing sends nothing.
    assert_eq!(lab.stats().port("dp2").unwrap().tx_packets, 0);
}

#[test]
fn ipv6_neighbor_discovery_is_answered_by_the_data_plane() {
    let lab = Lab::start_with(true);
    let out = lab.vm(0).sh("ping -6 -c 3 -i 0.2 -W 2 fd00:1::11").unwrap();
    assert!(out.contains("3 received"), "{out}");
    let stats = lab.stats();
    assert!(stats.outcomes["nd_replied"] >= 1, "{stats:?}");
    // A global IPv6 source vm0 does not own is dropped.
    lab.vm(0)
        .ip(&["addr", "add", "fd00:1::99/64", "dev", "eth0", "nodad"])
        .unwrap();
    let r = lab
        .vm(0)
        .capture(&[
            "ping",
            "-6",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "fd00:1::99",
            "fd00:1::11",
        ])
        .unwrap();
    assert!(!r.success, "{r:?}");
    assert!(
        lab.stats()
            .port("dp0")
            .unwrap()
            .drops
            .get("spoofed_ip")
            .copied()
            .unwrap_or(0)
            >= 1
    );
}

#[test]
fn ipv6_routed_across_subnets() {
    let lab = Lab::start_with(true);
    for (i, gw) in [(0, "fd00:1::1"), (2, "fd00:2::1")] {
        lab.vm(i)
            .ip(&["-6", "route", "add", "default", "via", gw])
            .unwrap();
    }
    let out = lab.vm(0).sh("ping -6 -c 3 -i 0.2 -W 2 fd00:2::12").unwrap();
    assert!(out.contains("3 received"), "{out}");
    // vm2 replies with hop limit 64; the router takes one off.
    assert!(out.contains("ttl=63"), "{out}");
    let stats = lab.stats();
    assert!(stats.outcomes["routed"] >= 6, "{stats:?}");
}

/// udhcpc's event script: applies the lease and records what it got.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "$router"
    echo "ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu lease=$lease" > "$LEASE_FILE"
    ;;
esac
"#;

#[test]
fn dhcp_lease_from_keel_then_ping_the_gateway() {
    let lab = Lab::start();
    let mut state = desired();
    state.switches[0].dhcp = Some(keel_dataplane::model::DhcpSpec {
        lease_secs: 600,
        dns_servers: vec!["198.18.0.53".into()],
        mtu: Some(1450),
        server_ip: None,
    });
    match request(&lab.socket, &Request::Apply { state }).unwrap() {
        Response::Applied { .. } => {}
        other => panic!("{other:?}"),
    }
    // vm3 forgets its static address and asks keel.
    let vm = lab.vm(3);
    vm.sh("ip addr flush dev eth0").unwrap();
    let script = lab.dir().join("udhcpc.sh");
    let lease = lab.dir().join("lease");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    vm.exec(&["chmod", "+x", script.to_str().unwrap()]).unwrap();
    let out = vm
        .sh(&format!(
            "LEASE_FILE={} busybox udhcpc -i eth0 -f -q -n -t 5 -T 1 -s {} 2>&1",
            lease.display(),
            script.display()
        ))
        .unwrap();
    let got = std::fs::read_to_string(&lease).unwrap_or_else(|_| panic!("no lease: {out}"));
    assert!(
        got.contains("ip=10.0.1.12 mask=24 router=10.0.1.1"),
        "{got}"
    );
    assert!(got.contains("dns=198.18.0.53"), "{got}");
    assert!(got.contains("mtu=1450 lease=600"), "{got}");
    let addrs = vm.sh("ip -4 addr show dev eth0").unwrap();
    assert!(addrs.contains("10.0.1.12/24"), "{addrs}");
    let out = lab.ping(3, "10.0.1.1");
    assert!(out.contains("3 received"), "{out}");
    let out = lab.ping(3, lab.vms[2].ip);
    assert!(out.contains("3 received"), "routed after DHCP: {out}");
    let stats = lab.stats();
    assert!(stats.outcomes["dhcp_offer_sent"] >= 1, "{stats:?}");
    assert!(stats.outcomes["dhcp_ack_sent"] >= 1, "{stats:?}");
}
