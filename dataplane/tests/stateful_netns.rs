//! Security groups and NAT with real TCP stacks in network namespaces.
//!
//! A "switch" namespace runs the data plane on veths `dpN`; each host
//! namespace holds the other end as `eth0` (TX checksum offload off, see the
//! crate docs). Sockets are real: they are opened by threads that entered
//! the hosts' namespaces.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use keel_dataplane::control::{request, Request, Response};
use keel_dataplane::counters::StatsSnapshot;
use keel_dataplane::model::{
    AddressGroupSpec, DesiredState, FirewallRuleSpec, NatKind, NatRuleSpec, PortRangeSpec,
    PortSetSpec, PortSpec, RouterPortSpec, RouterSpec, RuleAction, RuleDirection,
    SecurityGroupSpec, SecurityRuleSpec, SwitchSpec,
};

mod common;

use common::{in_netns, wait_for, Host, Lab};

/// (name, switch, MAC, address/len, gateway)
type HostSpec = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

fn lab(hosts: &[HostSpec], state: &DesiredState) -> Lab {
    lab_with(hosts, state, &[])
}

fn lab_with(hosts: &[HostSpec], state: &DesiredState, extra: &[&str]) -> Lab {
    let hosts: Vec<Host> = hosts
        .iter()
        .map(|&(name, _, mac, cidr, gateway)| Host {
            name,
            mac,
            cidr,
            gateway,
        })
        .collect();
    Lab::start_with("ctsw", &hosts, state, extra)
}

/// What the tests ask a lab beyond the common part.
trait LabExt {
    fn stats(&self) -> StatsSnapshot;
    fn listen(&self, host: usize, port: u16) -> TcpListener;
    fn connect(&self, host: usize, to: &str) -> std::io::Result<TcpStream>;
}

impl LabExt for Lab {
    fn stats(&self) -> StatsSnapshot {
        // The worker folds counters once per round: wait until they settle.
        let get = || match self.request(&Request::Stats) {
            Response::Stats { stats } => stats,
            other => panic!("{other:?}"),
        };
        let mut last = get();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = get();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    fn listen(&self, host: usize, port: u16) -> TcpListener {
        in_netns(self.ns(host), || {
            TcpListener::bind(("0.0.0.0", port)).unwrap()
        })
    }

    /// Connects from `host`; `Err` when the handshake does not complete.
    fn connect(&self, host: usize, to: &str) -> std::io::Result<TcpStream> {
        let addr: SocketAddr = to.parse().unwrap();
        in_netns(self.ns(host), || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
    }
}

fn accept(l: &TcpListener) -> (TcpStream, SocketAddr) {
    let (s, peer) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    (s, peer)
}

/// Sends `msg` from `a` and reads it at `b`.
fn deliver(a: &mut TcpStream, b: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    a.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    b.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

fn switch(name: &str, subnet: &str) -> SwitchSpec {
    SwitchSpec {
        name: name.into(),
        subnet: subnet.into(),
        vlan: None,
        subnet6: None,
        dhcp: None,
    }
}

fn port(hosts: &[HostSpec], i: usize, port_security: bool) -> PortSpec {
    let (name, sw, mac, cidr, _) = hosts[i];
    PortSpec {
        name: name.into(),
        switch: sw.into(),
        interface: format!("dp{i}"),
        mac: Some(mac.into()),
        ips: vec![cidr.split('/').next().unwrap().into()],
        port_security,
    }
}

fn tcp_in(port: u16) -> SecurityRuleSpec {
    SecurityRuleSpec {
        direction: RuleDirection::Ingress,
        ethertype: Default::default(),
        protocol: Some("tcp".into()),
        port_min: Some(port),
        port_max: Some(port),
        icmp_type: None,
        icmp_code: None,
        remote_cidr: Some("10.0.1.0/24".into()),
        remote_group: None,
        remote_address_group: None,
        port_set: None,
        priority: 10,
        action: RuleAction::Allow,
    }
}

const SG_HOSTS: [HostSpec; 2] = [
    ("client", "a", "02:00:00:00:00:10", "10.0.1.10/24", ""),
    ("server", "a", "02:00:00:00:00:11", "10.0.1.11/24", ""),
];

/// The server port is in group "web", which lets in TCP to `ports`.
fn sg_state(ports: &[u16]) -> DesiredState {
    DesiredState {
        switches: vec![switch("a", "10.0.1.0/24")],
        ports: (0..2).map(|i| port(&SG_HOSTS, i, true)).collect(),
        security_groups: vec![SecurityGroupSpec {
            name: "web".into(),
            ports: vec!["server".into()],
            rules: ports.iter().map(|p| tcp_in(*p)).collect(),
        }],
        ..DesiredState::default()
    }
}

#[test]
fn security_groups_allow_deny_and_cut_on_rule_change() {
    let lab = lab(&SG_HOSTS, &sg_state(&[5000, 5001]));
    let (server, client) = (1, 0);
    let web = lab.listen(server, 5000);
    let api = lab.listen(server, 5001);
    let ssh = lab.listen(server, 6000);

    // Allowed: a real connection carries data both ways (replies pass).
    let mut a_client = lab.connect(client, "10.0.1.11:5000").unwrap();
    let (mut a_server, _) = accept(&web);
    deliver(&mut a_client, &mut a_server, b"request").unwrap();
    deliver(&mut a_server, &mut a_client, b"response").unwrap();
    let mut b_client = lab.connect(client, "10.0.1.11:5001").unwrap();
    let (mut b_server, _) = accept(&api);
    deliver(&mut b_client, &mut b_server, b"hello").unwrap();

    // Denied: the listener exists, the handshake never completes.
    let denied = lab.connect(client, "10.0.1.11:6000");
    assert!(denied.is_err(), "port 6000 must be filtered");
    ssh.set_nonblocking(true).unwrap();
    assert_eq!(
        ssh.accept().unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "nothing reached the server"
    );
    // Stateful egress: the server (default allow egress) reaches the client,
    // and the client's replies come back in although no rule lets them in.
    let back = lab.listen(client, 7000);
    let mut c = lab.connect(server, "10.0.1.10:7000").unwrap();
    let (mut c_peer, _) = accept(&back);
    deliver(&mut c, &mut c_peer, b"out").unwrap();
    deliver(&mut c_peer, &mut c, b"back").unwrap();

    // Rule change: 5000 is no longer allowed. Its established connection is
    // cut on the next packet; 5001's stays up.
    lab.apply(&sg_state(&[5001]));
    a_client.write_all(b"after").unwrap();
    let mut buf = [0u8; 5];
    let err = a_server.read_exact(&mut buf).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err:?}"
    );
    deliver(&mut b_client, &mut b_server, b"still").unwrap();
    deliver(&mut b_server, &mut b_client, b"alive").unwrap();
    // ... and a new connection to 5000 is refused too.
    assert!(lab.connect(client, "10.0.1.11:5000").is_err());

    let stats = lab.stats();
    let drops = &stats.port("dp0").unwrap().drops;
    assert!(
        drops.get("security_group_denied").copied().unwrap_or(0) >= 2,
        "{stats:?}"
    );
    assert!(stats.conntrack["created"] >= 3, "{stats:?}");
    // Per-rule hits: the 5001 rule (now rule 0 of "web") saw its connection again.
    match lab.request(&Request::RuleStats) {
        Response::RuleStats { rules } => {
            assert_eq!(rules.len(), 1);
            assert!(rules[0].hits >= 1, "{rules:?}");
        }
        other => panic!("{other:?}"),
    }
    // Flushing the server's zone drops its connections: 5001 is picked up
    // again from its next packet (still allowed), so it keeps working.
    match request(
        &lab.socket,
        &Request::CtFlush {
            port: Some("server".into()),
            router: None,
        },
    )
    .unwrap()
    {
        Response::FlushRequested { .. } => {}
        other => panic!("{other:?}"),
    }
    wait_for(
        || lab.stats().conntrack["flushed"] >= 2,
        "the zone flush to run",
    );
    deliver(&mut b_client, &mut b_server, b"after-flush").unwrap();
}

const SET_HOSTS: [HostSpec; 3] = [
    ("admin", "a", "02:00:00:00:00:10", "10.0.1.10/24", ""),
    ("server", "a", "02:00:00:00:00:11", "10.0.1.11/24", ""),
    ("guest", "a", "02:00:00:00:00:12", "10.0.1.12/24", ""),
];

/// The server's group lets in TCP from address group "admins" to port set
/// "svc": one rule, matched as a prefix set and a port-range set.
fn set_state(admins: &[&str], svc: &[(u16, u16)]) -> DesiredState {
    DesiredState {
        switches: vec![switch("a", "10.0.1.0/24")],
        ports: (0..3).map(|i| port(&SET_HOSTS, i, true)).collect(),
        security_groups: vec![SecurityGroupSpec {
            name: "web".into(),
            ports: vec!["server".into()],
            rules: vec![SecurityRuleSpec {
                port_min: None,
                port_max: None,
                remote_cidr: None,
                remote_address_group: Some("admins".into()),
                port_set: Some("svc".into()),
                ..tcp_in(0)
            }],
        }],
        address_groups: vec![AddressGroupSpec {
            name: "admins".into(),
            addresses: admins.iter().map(|a| a.to_string()).collect(),
        }],
        port_sets: vec![PortSetSpec {
            name: "svc".into(),
            ports: svc
                .iter()
                .map(|&(min, max)| PortRangeSpec { min, max })
                .collect(),
        }],
        ..DesiredState::default()
    }
}

#[test]
fn address_group_and_port_set_rule_admits_exactly_its_connections() {
    // 10.0.1.10 is in the group (with unrelated prefixes around it), .12 not.
    let lab = lab(
        &SET_HOSTS,
        &set_state(
            &["192.0.2.0/24", "10.0.1.10/32", "fd00:1::/64"],
            &[(5000, 5000), (6000, 6010)],
        ),
    );
    let (admin, server, guest) = (0, 1, 2);
    let listeners: Vec<(u16, TcpListener)> = [4999, 5000, 5001, 6000, 6010, 6011, 7000]
        .into_iter()
        .map(|p| (p, lab.listen(server, p)))
        .collect();
    // Probes run side by side: a denied handshake waits out its timeout.
    let lab_ref = &lab;
    let admitted = |from: usize| -> Vec<u16> {
        let lab = lab_ref;
        let connected: Vec<_> = std::thread::scope(|s| {
            let probes: Vec<_> = listeners
                .iter()
                .map(|(p, _)| s.spawn(move || lab.connect(from, &format!("10.0.1.11:{p}")).ok()))
                .collect();
            probes.into_iter().map(|h| h.join().unwrap()).collect()
        });
        listeners
            .iter()
            .zip(connected)
            .filter_map(|((p, l), c)| {
                let client = c?;
                let (server, _) = accept(l);
                drop((client, server));
                Some(*p)
            })
            .collect()
    };
    assert_eq!(admitted(admin), [5000, 6000, 6010], "the set's ports only");
    assert_eq!(admitted(guest), Vec::<u16>::new(), "not in the group");
    let mut kept = lab.connect(admin, "10.0.1.11:5000").unwrap();
    let (mut kept_peer, _) = accept(&listeners[1].1);

    // The group and the set change (the rule does not): new connections
    // follow at once, and the admin's connection, no longer allowed, is cut.
    lab.apply(&set_state(
        &["10.0.1.12/32", "192.0.2.0/24"],
        &[(5000, 5001), (7000, 7000)],
    ));
    assert_eq!(admitted(guest), [5000, 5001, 7000]);
    assert_eq!(admitted(admin), Vec::<u16>::new());
    kept.write_all(b"after").unwrap();
    let mut buf = [0u8; 5];
    let err = kept_peer.read_exact(&mut buf).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err:?}"
    );
    // The one rule decided every connection admitted since the change
    // (counters start again with each applied state).
    match lab.request(&Request::RuleStats) {
        Response::RuleStats { rules } => {
            assert_eq!(rules.len(), 1);
            assert!(rules[0].hits >= 3, "{rules:?}");
        }
        other => panic!("{other:?}"),
    }
}

const NAT_HOSTS: [HostSpec; 3] = [
    (
        "vmfip",
        "a",
        "02:00:00:00:00:10",
        "10.0.1.10/24",
        "10.0.1.1",
    ),
    (
        "vmsnat",
        "a",
        "02:00:00:00:00:11",
        "10.0.1.11/24",
        "10.0.1.1",
    ),
    (
        "internet",
        "ext",
        "02:00:00:00:00:99",
        "198.18.0.100/24",
        "",
    ),
];

fn nat_state() -> DesiredState {
    let nat = |kind, ext: &str, logical: &str| NatRuleSpec {
        router: "r".into(),
        kind,
        external_ip: ext.into(),
        logical_ip: logical.into(),
        protocol: None,
        external_port: None,
        logical_port: None,
        port_min: None,
        port_max: None,
    };
    DesiredState {
        switches: vec![switch("a", "10.0.1.0/24"), switch("ext", "198.18.0.0/24")],
        ports: vec![
            port(&NAT_HOSTS, 0, true),
            port(&NAT_HOSTS, 1, true),
            port(&NAT_HOSTS, 2, false),
        ],
        routers: vec![RouterSpec {
            name: "r".into(),
            ports: vec![
                RouterPortSpec {
                    switch: "a".into(),
                    mac: "02:00:00:00:ff:01".into(),
                    ip: "10.0.1.1".into(),
                    ip6: None,
                },
                RouterPortSpec {
                    switch: "ext".into(),
                    mac: "02:00:00:00:ff:09".into(),
                    ip: "198.18.0.1".into(),
                    ip6: None,
                },
            ],
            static_routes: vec![],
        }],
        nat: vec![
            nat(NatKind::Snat, "198.18.0.1", "10.0.1.0/24"),
            nat(NatKind::DnatAndSnat, "198.18.0.50", "10.0.1.10"),
            NatRuleSpec {
                protocol: Some("tcp".into()),
                external_port: Some(8080),
                logical_port: Some(80),
                ..nat(NatKind::Dnat, "198.18.0.1", "10.0.1.11")
            },
        ],
        // The router firewall sees the translated (internal) destination.
        firewall: vec![FirewallRuleSpec {
            router: "r".into(),
            priority: 10,
            protocol: Some("tcp".into()),
            src_cidr: None,
            dst_cidr: Some("10.0.1.10/32".into()),
            port_min: Some(5001),
            port_max: None,
            action: RuleAction::Deny,
        }],
        ..DesiredState::default()
    }
}

#[test]
fn snat_dnat_and_floating_ip_with_an_internet_host() {
    nat_with_an_internet_host(&lab(&NAT_HOSTS, &nat_state()));
}

/// The same with two workers: frames arrive on either worker's socket
/// (PACKET_FANOUT) and are steered so each connection, NATed or not, is
/// handled by one worker in both directions.
#[test]
fn snat_dnat_and_floating_ip_with_two_workers() {
    nat_with_an_internet_host(&lab_with(&NAT_HOSTS, &nat_state(), &["--workers", "2"]));
}

/// Two workers, many parallel TCP connections through a security group and
/// SNAT: every connection carries data both ways, both workers track some
/// of them, and nothing is dropped as invalid, denied or for want of a port.
#[test]
fn two_workers_share_parallel_snat_connections() {
    const CONNECTIONS: usize = 32;
    let mut state = nat_state();
    // Default groups: egress allowed, ingress only as replies (stateful).
    state.security_groups = vec![SecurityGroupSpec {
        name: "egress-only".into(),
        ports: vec!["vmsnat".into()],
        rules: vec![],
    }];
    let lab = lab_with(&NAT_HOSTS, &state, &["--workers", "2"]);
    let (snat_vm, internet) = (1, 2);
    let l = lab.listen(internet, 7000);
    let mut pairs = Vec::new();
    for i in 0..CONNECTIONS {
        let mut c = lab.connect(snat_vm, "198.18.0.100:7000").unwrap();
        let (mut s, peer) = accept(&l);
        assert_eq!(peer.ip().to_string(), "198.18.0.1");
        deliver(&mut c, &mut s, format!("out {i}").as_bytes()).unwrap();
        pairs.push((c, s));
    }
    for (i, (c, s)) in pairs.iter_mut().enumerate() {
        deliver(s, c, format!("back {i}").as_bytes()).unwrap();
        deliver(c, s, &vec![u8::try_from(i).unwrap(); 64 * 1024]).unwrap();
    }
    let stats = lab.stats();
    assert_eq!(stats.workers.len(), 2, "{stats:?}");
    for (i, w) in stats.workers.iter().enumerate() {
        // Each connection has a router (SNAT) and a port-zone entry on its worker.
        assert!(
            w["processed"] > 0 && w["conntrack_entries"] >= 2,
            "worker {i} carried no connection: {stats:?}"
        );
    }
    assert!(
        stats.conntrack["created"] >= 2 * CONNECTIONS as u64,
        "{stats:?}"
    );
    for p in &stats.ports {
        for bad in [
            "ct_invalid",
            "security_group_denied",
            "nat_ports_exhausted",
            "handoff_full",
            "ct_table_full",
        ] {
            assert_eq!(p.drops.get(bad), None, "{}: {stats:?}", p.interface);
        }
    }
    // Zone flushes reach both workers.
    match lab.request(&Request::CtFlush {
        port: Some("vmsnat".into()),
        router: None,
    }) {
        Response::FlushRequested { .. } => {}
        other => panic!("{other:?}"),
    }
    wait_for(
        || lab.stats().conntrack["flushed"] >= CONNECTIONS as u64,
        "both workers to flush the port's zone",
    );
}

fn nat_with_an_internet_host(lab: &Lab) {
    let (fip_vm, snat_vm, internet) = (0, 1, 2);

    // Floating IP: the internet host reaches the VM at 198.18.0.50, and the VM
    // sees the real client address.
    let l = lab.listen(fip_vm, 5000);
    let mut c = lab.connect(internet, "198.18.0.50:5000").unwrap();
    let (mut s, peer) = accept(&l);
    assert_eq!(peer.ip().to_string(), "198.18.0.100");
    deliver(&mut c, &mut s, b"to the floating ip").unwrap();
    deliver(&mut s, &mut c, b"from behind it").unwrap();

    // DNAT port forwarding: 198.18.0.1:8080 → the other VM's port 80.
    let l = lab.listen(snat_vm, 80);
    let mut c = lab.connect(internet, "198.18.0.1:8080").unwrap();
    let (mut s, peer) = accept(&l);
    assert_eq!(peer.ip().to_string(), "198.18.0.100");
    deliver(&mut c, &mut s, b"forwarded").unwrap();
    deliver(&mut s, &mut c, b"answered").unwrap();

    // SNAT: the VM without a floating IP reaches the internet host, which
    // sees the router's external address; the floating-IP VM leaves as its FIP.
    let l = lab.listen(internet, 7000);
    let mut c = lab.connect(snat_vm, "198.18.0.100:7000").unwrap();
    let (mut s, peer) = accept(&l);
    assert_eq!(peer.ip().to_string(), "198.18.0.1");
    deliver(&mut c, &mut s, b"outbound").unwrap();
    deliver(&mut s, &mut c, b"inbound reply").unwrap();
    let mut c = lab.connect(fip_vm, "198.18.0.100:7000").unwrap();
    let (mut s, peer) = accept(&l);
    assert_eq!(peer.ip().to_string(), "198.18.0.50");
    deliver(&mut c, &mut s, b"fip outbound").unwrap();

    // ICMP echo through SNAT (identifier translated).
    let out = lab.hosts[snat_vm]
        .sh("ping -c 3 -i 0.2 -W 2 198.18.0.100")
        .unwrap();
    assert!(out.contains("3 received"), "{out}");

    // An ICMP error crossing SNAT is translated back: the internet host's
    // "port unreachable" quotes 198.18.0.1:<port>; the VM's socket only sees
    // ECONNREFUSED if the quoted packet is restored to its own address/port
    // (and every checksum is right).
    let refused = in_netns(lab.ns(snat_vm), || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.connect("198.18.0.100:9").unwrap();
        s.send(b"anyone?").unwrap();
        s.recv(&mut [0u8; 16]).unwrap_err().kind()
    });
    assert_eq!(refused, ErrorKind::ConnectionRefused);

    // Nothing unsolicited gets in through the SNAT address.
    assert!(lab.connect(internet, "198.18.0.1:7001").is_err());

    // Router firewall: port 5001 of the floating-IP VM is dropped at the
    // router although the VM listens; 5000 keeps working.
    let blocked = lab.listen(fip_vm, 5001);
    assert!(lab.connect(internet, "198.18.0.50:5001").is_err());
    blocked.set_nonblocking(true).unwrap();
    assert_eq!(blocked.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    let l = lab.listen(fip_vm, 5002);
    assert!(lab.connect(internet, "198.18.0.50:5002").is_ok());
    drop(l);
    let stats = lab.stats();
    let drops = &stats.port("dp2").unwrap().drops;
    assert!(
        drops.get("firewall_denied").copied().unwrap_or(0) >= 1,
        "{stats:?}"
    );
}
