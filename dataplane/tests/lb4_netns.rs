//! L4 load balancing with real TCP/UDP stacks in network namespaces: a
//! client on switch "a" reaches VIPs on the router; three members on switch
//! "b" answer with their own name and the client address they see.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_dataplane::control::{Request, Response};
use keel_dataplane::lb4::{
    LbMemberSpec, LbMemberStats, LbMonitorSpec, LbProtocol, LoadBalancerSpec, MemberHealth,
    ProbeKind,
};
use keel_dataplane::model::{DesiredState, PortSpec, RouterPortSpec, RouterSpec, SwitchSpec};

mod common;

use common::{in_netns, wait_for, Host, Lab};

const HOSTS: [(&str, &str, &str, &str, &str); 4] = [
    (
        "client",
        "a",
        "02:00:00:00:00:10",
        "10.0.1.10/24",
        "10.0.1.1",
    ),
    ("m1", "b", "02:00:00:00:00:21", "10.0.2.21/24", "10.0.2.1"),
    ("m2", "b", "02:00:00:00:00:22", "10.0.2.22/24", "10.0.2.1"),
    ("m3", "b", "02:00:00:00:00:23", "10.0.2.23/24", "10.0.2.1"),
];
const CLIENT: usize = 0;
const VIP: &str = "10.0.1.100";

fn ip_of(i: usize) -> &'static str {
    HOSTS[i].3.split('/').next().unwrap()
}

/// Weights 1, 1, 2 for m1..m3.
const ALL: [(usize, u16); 3] = [(1, 1), (2, 1), (3, 2)];

/// TCP VIP:80 → `members` (host index, weight) port 8080, UDP VIP:53 → the
/// same members port 5353.
fn state(members: &[(usize, u16)]) -> DesiredState {
    let switch = |name: &str, subnet: &str| SwitchSpec {
        name: name.into(),
        subnet: subnet.into(),
        vlan: None,
        subnet6: None,
        dhcp: None,
    };
    let lb = |name: &str, protocol, port, member_port| LoadBalancerSpec {
        name: name.into(),
        router: "r".into(),
        vip: VIP.into(),
        protocol,
        port,
        hash: Default::default(),
        monitor: None,
        members: members
            .iter()
            .map(|&(i, weight)| LbMemberSpec {
                ip: ip_of(i).into(),
                port: member_port,
                weight,
            })
            .collect(),
    };
    DesiredState {
        switches: vec![switch("a", "10.0.1.0/24"), switch("b", "10.0.2.0/24")],
        ports: HOSTS
            .iter()
            .enumerate()
            .map(|(i, &(name, sw, mac, _, _))| PortSpec {
                name: name.into(),
                switch: sw.into(),
                interface: format!("dp{i}"),
                mac: Some(mac.into()),
                ips: vec![ip_of(i).into()],
                port_security: true,
            })
            .collect(),
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
                    switch: "b".into(),
                    mac: "02:00:00:00:ff:02".into(),
                    ip: "10.0.2.1".into(),
                    ip6: None,
                },
            ],
            static_routes: vec![],
        }],
        load_balancers: vec![
            lb("web", LbProtocol::Tcp, 80, 8080),
            lb("dns", LbProtocol::Udp, 53, 5353),
        ],
        ..DesiredState::default()
    }
}

fn lab(extra: &[&str]) -> Lab {
    let hosts: Vec<Host> = HOSTS
        .iter()
        .map(|&(name, _, mac, cidr, gateway)| Host {
            name,
            mac,
            cidr,
            gateway,
        })
        .collect();
    Lab::start_with("lbsw", &hosts, &state(&ALL), extra)
}

/// The member servers: every accepted connection is counted at its member
/// and answered with "<member> <client address>\n", then "<member>\n" for
/// every further line. Stopped (threads exit) when dropped.
struct Members {
    stop: Arc<AtomicBool>,
    accepted: Vec<Arc<AtomicUsize>>,
}

impl Drop for Members {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_tcp(name: &'static str, l: TcpListener, count: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((s, peer)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || {
                s.set_nonblocking(false).ok();
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let mut w = s.try_clone().unwrap();
                if w.write_all(format!("{name} {}\n", peer.ip()).as_bytes())
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 64];
                let mut r = s;
                while matches!(r.read(&mut buf), Ok(n) if n > 0) {
                    if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn serve_udp(name: &'static str, s: UdpSocket, stop: Arc<AtomicBool>) {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
            }
        }
    });
}

fn start_members(lab: &Lab) -> Members {
    let stop = Arc::new(AtomicBool::new(false));
    let mut accepted = Vec::new();
    for (i, host) in HOSTS.iter().enumerate().skip(1) {
        let name = host.0;
        let count = Arc::new(AtomicUsize::new(0));
        let (l, u) = in_netns(lab.ns(i), || {
            (
                TcpListener::bind("0.0.0.0:8080").unwrap(),
                UdpSocket::bind("0.0.0.0:5353").unwrap(),
            )
        });
        serve_tcp(name, l, count.clone(), stop.clone());
        serve_udp(name, u, stop.clone());
        accepted.push(count);
    }
    Members { stop, accepted }
}

/// A connection from the client to VIP:80 and the first line its member sent.
fn connect(lab: &Lab) -> (BufReader<TcpStream>, String) {
    let addr: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let s = in_netns(lab.ns(CLIENT), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()
    });
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    (r, line.trim().to_string())
}

/// Asks an open connection again; the member that answers.
fn again(c: &mut BufReader<TcpStream>) -> String {
    c.get_mut().write_all(b"again\n").unwrap();
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    line.trim().to_string()
}

fn lb_stats(lab: &Lab) -> Vec<LbMemberStats> {
    match lab.request(&Request::LbStats) {
        Response::LbStats { members } => members,
        other => panic!("{other:?}"),
    }
}

fn balance_tcp(lab: &Lab) {
    let members = start_members(lab);
    let n = 120;
    let mut by_member: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        let (_, line) = connect(lab);
        let (member, client) = line.split_once(' ').unwrap();
        assert_eq!(client, ip_of(CLIENT), "the member sees the real client");
        *by_member.entry(member.to_string()).or_default() += 1;
    }
    // Counted at the members themselves.
    let at = |i: usize| members.accepted[i - 1].load(Ordering::Relaxed);
    wait_for(
        || (1..=3).map(at).sum::<usize>() == n,
        "every accept counted",
    );
    for i in 1..=3 {
        assert_eq!(at(i), by_member[HOSTS[i].0], "{by_member:?}");
        assert!(at(i) >= 10, "{} got {} of {n}", HOSTS[i].0, at(i));
    }
    // Weight 2 for m3 against 1 and 1: about half of the connections.
    assert!(at(3) > at(1) && at(3) > at(2), "{by_member:?}");
    // The data plane's own counters agree.
    wait_for(
        || {
            lb_stats(lab)
                .iter()
                .filter(|s| s.load_balancer == "web")
                .map(|s| s.flows)
                .sum::<u64>()
                == n as u64
        },
        "lb_stats flows",
    );
    for s in lb_stats(lab).iter().filter(|s| s.load_balancer == "web") {
        let name = HOSTS
            .iter()
            .find(|h| h.3.starts_with(&format!("{}/", s.ip)))
            .unwrap()
            .0;
        assert_eq!(s.flows, by_member[name] as u64, "{s:?}");
        assert!(s.packets > s.flows * 4, "{s:?}");
    }

    // Long-lived connections, then m1 is drained (weight 0) and removed,
    // each applied in place: open connections keep their member (m1's while
    // it drains), new ones avoid m1 from the drain on.
    // At least 24, and until one is on m1 (the hash may cluster a few
    // consecutive client ports; bounded so a broken spread still fails).
    let mut open: Vec<(BufReader<TcpStream>, String)> = Vec::new();
    while open.len() < 24 || (open.len() < 200 && !open.iter().any(|(_, m)| m == "m1")) {
        let (c, line) = connect(lab);
        let member = line.split(' ').next().unwrap().to_string();
        open.push((c, member));
    }
    assert!(open.iter().any(|(_, m)| m == "m1"), "some open flow on m1");
    let new_connections = |lab: &Lab| {
        let m1_before = at(1);
        let mut to: HashMap<String, usize> = HashMap::new();
        for _ in 0..40 {
            let (_, line) = connect(lab);
            *to.entry(line.split(' ').next().unwrap().into())
                .or_default() += 1;
        }
        assert_eq!(at(1), m1_before, "no new connection reached m1");
        assert!(!to.contains_key("m1"), "{to:?}");
        assert!(to.contains_key("m2") && to.contains_key("m3"), "{to:?}");
    };
    lab.apply(&state(&[(1, 0), (2, 1), (3, 2)]));
    for (c, member) in &mut open {
        assert_eq!(again(c), *member, "an open connection changed member");
    }
    new_connections(lab);
    open.retain(|(_, m)| m != "m1");
    lab.apply(&state(&[(2, 1), (3, 2)]));
    for (c, member) in &mut open {
        assert_eq!(again(c), *member, "an open connection changed member");
    }
    new_connections(lab);
    drop(open);

    // Trace: the lb stage names the balancer and the member it picks.
    let trace = lab.request(&Request::Trace {
        interface: "dp0".into(),
        frame_hex: None,
        packet: Some(keel_dataplane::control::PacketSpec {
            eth_src: HOSTS[0].2.into(),
            eth_dst: "02:00:00:00:ff:01".into(),
            vlan: None,
            arp: false,
            ip_src: ip_of(CLIENT).parse().unwrap(),
            ip_dst: VIP.parse().unwrap(),
            ttl: 64,
            protocol: keel_dataplane::control::Protocol::Tcp,
        }),
    });
    let Response::Trace { steps, .. } = trace else {
        panic!("{trace:?}");
    };
    assert!(
        steps
            .iter()
            .any(|s| s.stage == "lb" && s.decision.contains("\"web\"")),
        "{steps:?}"
    );
}

#[test]
fn tcp_connections_spread_by_weight_and_stick_across_member_removal() {
    balance_tcp(&lab(&[]));
}

/// The same with two workers: the VIP and member endpoints steer a client's
/// packets and the member's replies to one worker.
#[test]
fn tcp_balancing_with_two_workers() {
    balance_tcp(&lab(&["--workers", "2"]));
}

#[test]
fn udp_requests_are_answered_through_the_vip() {
    let lab = lab(&[]);
    let _members = start_members(&lab);
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let sock = in_netns(lab.ns(CLIENT), || UdpSocket::bind("10.0.1.10:0").unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // Datagrams may meet an unresolved neighbor on the first try: retry.
        let mut answer = None;
        for _ in 0..6 {
            sock.send_to(b"query", vip).unwrap();
            let mut buf = [0u8; 128];
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                assert_eq!(from, vip, "the reply comes from the VIP");
                answer = Some(String::from_utf8_lossy(&buf[..n]).to_string());
                break;
            }
        }
        let answer = answer.expect("a UDP answer through the VIP");
        let (member, client) = answer.split_once(' ').unwrap();
        assert_eq!(client, ip_of(CLIENT), "the member sees the real client");
        *seen.entry(member.to_string()).or_default() += 1;
        // The same socket (flow) keeps its member.
        sock.send_to(b"query", vip).unwrap();
        let mut buf = [0u8; 128];
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with(member));
    }
    assert_eq!(seen.len(), 3, "every member answered some flows: {seen:?}");
    // The router answers pings to the VIP.
    lab.hosts[CLIENT]
        .sh(&format!("ping -c 2 -i 0.2 -W 2 {VIP}"))
        .unwrap();
}

/// A TCP monitor on "web": probes every 200 ms, two in a row decide.
fn monitored(members: &[(usize, u16)]) -> DesiredState {
    let mut s = state(members);
    s.load_balancers[0].monitor = Some(LbMonitorSpec {
        kind: ProbeKind::Tcp,
        interval_ms: 200,
        timeout_ms: 150,
        rise: 2,
        fall: 2,
    });
    s
}

/// The data plane probes the members itself (SYN from the router, RST
/// after the SYN-ACK): a member whose server stops is taken out of new
/// connections, and comes back when it listens again.
#[test]
fn monitored_members_that_stop_answering_get_no_new_connections() {
    monitor_members(&lab(&[]));
}

/// The same with two workers: each probe leaves from the worker its
/// answer is steered to.
#[test]
fn monitored_members_with_two_workers() {
    monitor_members(&lab(&["--workers", "2"]));
}

fn monitor_members(lab: &Lab) {
    lab.apply(&monitored(&ALL));
    let stop = Arc::new(AtomicBool::new(false));
    let stop_m3 = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let listen = |i: usize, stop: &Arc<AtomicBool>| {
        let l = in_netns(lab.ns(i), || TcpListener::bind("0.0.0.0:8080").unwrap());
        serve_tcp(HOSTS[i].0, l, accepted.clone(), stop.clone());
    };
    listen(1, &stop);
    listen(2, &stop);
    listen(3, &stop_m3);
    let member = |i: usize| {
        lb_stats(lab)
            .into_iter()
            .find(|s| s.load_balancer == "web" && s.ip.to_string() == ip_of(i))
            .unwrap()
    };
    wait_for(
        || (1..=3).all(|i| member(i).probes_answered >= 2),
        "every member answers probes",
    );
    assert!((1..=3).all(|i| member(i).health == MemberHealth::Up));
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        0,
        "probes are reset before the server accepts them"
    );

    stop_m3.store(true, Ordering::Relaxed);
    wait_for(|| member(3).health == MemberHealth::Down, "m3 taken out");
    let mut to: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let (_, line) = connect(lab);
        *to.entry(line.split(' ').next().unwrap().into())
            .or_default() += 1;
    }
    assert!(!to.contains_key("m3"), "{to:?}");
    assert!(to.contains_key("m1") && to.contains_key("m2"), "{to:?}");

    listen(3, &stop);
    wait_for(|| member(3).health == MemberHealth::Up, "m3 back");
    let mut back = false;
    for _ in 0..60 {
        if connect(lab).1.starts_with("m3 ") {
            back = true;
            break;
        }
    }
    assert!(back, "m3 gets new connections again");
    let Response::Stats { stats } = lab.request(&Request::Stats) else {
        panic!("stats");
    };
    assert!(
        stats.outcomes["lb_probe_answered"] > 0,
        "{:?}",
        stats.outcomes
    );
    assert!(
        stats.outcomes["lb_probe_refused"] > 0,
        "m3 refused while out"
    );
    stop.store(true, Ordering::Relaxed);
}

/// A ping monitor on the UDP "dns" load balancer: a member that stops
/// answering echo requests gets no new flows until it answers again.
#[test]
fn udp_members_are_probed_by_ping() {
    let lab = lab(&[]);
    let mut s = state(&ALL);
    s.load_balancers[1].monitor = Some(LbMonitorSpec {
        kind: ProbeKind::Ping,
        interval_ms: 200,
        timeout_ms: 150,
        rise: 2,
        fall: 2,
    });
    lab.apply(&s);
    let _members = start_members(&lab);
    let member = |i: usize| {
        lb_stats(&lab)
            .into_iter()
            .find(|s| s.load_balancer == "dns" && s.ip.to_string() == ip_of(i))
            .unwrap()
    };
    wait_for(
        || (1..=3).all(|i| member(i).health == MemberHealth::Up && member(i).probes_answered >= 2),
        "every member answers pings",
    );
    let ignore = |on: bool| {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", lab.ns(3), "sysctl", "-qw"])
            .arg(format!("net.ipv4.icmp_echo_ignore_all={}", u8::from(on)))
            .status()
            .unwrap();
        assert!(status.success());
    };
    ignore(true);
    wait_for(|| member(3).health == MemberHealth::Down, "m3 taken out");
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    for _ in 0..20 {
        let sock = in_netns(lab.ns(CLIENT), || UdpSocket::bind("10.0.1.10:0").unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut answer = String::new();
        for _ in 0..6 {
            sock.send_to(b"query", vip).unwrap();
            let mut buf = [0u8; 128];
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                break;
            }
        }
        assert!(!answer.is_empty(), "answered through the VIP");
        assert!(!answer.starts_with("m3 "), "{answer}");
    }
    ignore(false);
    wait_for(|| member(3).health == MemberHealth::Up, "m3 back");
}

/// A client on the members' subnet (m1, itself a member) reaches the VIP:
/// the router hairpins it (the members see the VIP as the client).
#[test]
fn a_client_on_the_members_subnet_reaches_the_vip() {
    let lab = lab(&[]);
    let _members = start_members(&lab);
    let addr: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let s = in_netns(lab.ns(1), || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()
        });
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let (member, client) = line.trim().split_once(' ').unwrap();
        assert_eq!(client, VIP, "hairpinned through the VIP");
        *seen.entry(member.into()).or_default() += 1;
    }
    assert!(seen.len() >= 2, "spread over the members: {seen:?}");
}

/// A UDP-CONNECT monitor on "dns": a member whose socket closes answers the
/// probe with ICMP port unreachable and is taken out; back when it binds
/// again. (The member's ICMP rate limit is lifted: Linux sends one port
/// unreachable per second per peer by default, fewer than the probes here.)
#[test]
fn udp_members_that_close_their_port_are_taken_out() {
    let lab = lab(&[]);
    let mut s = state(&ALL);
    s.load_balancers[1].monitor = Some(LbMonitorSpec {
        kind: ProbeKind::UdpConnect,
        interval_ms: 200,
        timeout_ms: 150,
        rise: 2,
        fall: 2,
    });
    let status = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.ns(3),
            "sysctl",
            "-qw",
            "net.ipv4.icmp_ratelimit=0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let stop = Arc::new(AtomicBool::new(false));
    let stop_m3 = Arc::new(AtomicBool::new(false));
    let bind = |i: usize, stop: &Arc<AtomicBool>| {
        let u = in_netns(lab.ns(i), || UdpSocket::bind("0.0.0.0:5353").unwrap());
        serve_udp(HOSTS[i].0, u, stop.clone());
    };
    bind(1, &stop);
    bind(2, &stop);
    bind(3, &stop_m3);
    // Probes start once every member listens.
    lab.apply(&s);
    let member = |i: usize| {
        lb_stats(&lab)
            .into_iter()
            .find(|s| s.load_balancer == "dns" && s.ip.to_string() == ip_of(i))
            .unwrap()
    };
    wait_for(
        || (1..=3).all(|i| member(i).probes_sent >= 3),
        "probes sent to every member",
    );
    assert!((1..=3).all(|i| member(i).health == MemberHealth::Up && member(i).probes_refused == 0));
    stop_m3.store(true, Ordering::Relaxed);
    wait_for(|| member(3).health == MemberHealth::Down, "m3 taken out");
    assert!(member(3).probes_refused >= 2);
    bind(3, &stop);
    wait_for(|| member(3).health == MemberHealth::Up, "m3 back");
    stop.store(true, Ordering::Relaxed);
}
