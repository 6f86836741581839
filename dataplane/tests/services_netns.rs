//! Network services (QoS, traffic mirroring) with real endpoints in
//! network namespaces: `iperf3` through a meter, `tcpdump` on the receiver
//! and on a mirror collector.
//!
//! A "switch" namespace runs the data plane on veths `dpN`; each host
//! namespace holds the other end as `eth0` (TX checksum offload off, see the
//! crate docs).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_dataplane::control::{Request, Response};
use keel_dataplane::mirror::{
    MirrorDirection, MirrorFilter, MirrorSpec, MirrorStats, MirrorTarget,
};
use keel_dataplane::model::{DesiredState, PortSpec, RouterPortSpec, RouterSpec, SwitchSpec};
use keel_dataplane::nat64::Nat64Spec;
use keel_dataplane::policy::{PolicyAction, PolicyStats, RouterPolicySpec};
use keel_dataplane::qos::{MeterSpec, MeterStats, QosSpec};
use keel_testkit::NetnsHost;

mod common;

use common::{in_netns, wait_for, Host, Lab};

/// (name, MAC, address/len; empty = a mirror collector)
type HostSpec = (&'static str, &'static str, &'static str);

fn lab(hosts: &[HostSpec], state: &DesiredState) -> Lab {
    lab_with(hosts, state, &[])
}

fn lab_with(hosts: &[HostSpec], state: &DesiredState, extra: &[&str]) -> Lab {
    let hosts: Vec<Host> = hosts
        .iter()
        .map(|&(name, mac, cidr)| Host {
            name,
            mac,
            cidr,
            gateway: "",
        })
        .collect();
    Lab::start_with("svsw", &hosts, state, extra)
}

fn mirror_stats(lab: &Lab) -> Vec<MirrorStats> {
    match lab.request(&Request::MirrorStats) {
        Response::MirrorStats { sessions } => sessions,
        other => panic!("{other:?}"),
    }
}

fn qos_stats(lab: &Lab) -> Vec<MeterStats> {
    match lab.request(&Request::QosStats) {
        Response::QosStats { meters } => meters,
        other => panic!("{other:?}"),
    }
}

fn port(name: &str, iface: &str, mac: &str, ip: &str) -> PortSpec {
    PortSpec {
        name: name.into(),
        switch: "a".into(),
        interface: iface.into(),
        mac: Some(mac.into()),
        ips: vec![ip.into()],
        port_security: true,
    }
}

fn two_hosts() -> DesiredState {
    DesiredState {
        switches: vec![SwitchSpec {
            name: "a".into(),
            subnet: "10.0.1.0/24".into(),
            vlan: None,
            subnet6: None,
            dhcp: None,
        }],
        ports: vec![
            port("client", "dp0", "02:00:00:00:00:10", "10.0.1.10"),
            port("server", "dp1", "02:00:00:00:00:11", "10.0.1.11"),
        ],
        ..DesiredState::default()
    }
}

const QOS_HOSTS: [HostSpec; 2] = [
    ("client", "02:00:00:00:00:10", "10.0.1.10/24"),
    ("server", "02:00:00:00:00:11", "10.0.1.11/24"),
];

/// Runs one `iperf3` TCP test client → server; returns the receiver's bit/s.
fn iperf3(lab: &Lab, seconds: u32) -> f64 {
    iperf3_between(lab, 0, 1, "10.0.1.11", "10.0.1.11", seconds)
}

/// A 100 Mbit/s meter's accuracy through TCP: never above 110 Mbit/s, and
/// at least 90 Mbit/s in one of three runs (a run while other tests load the
/// machine can read low because the sender, not the meter, was starved).
fn within_10_percent_of_100_mbit(mut measure: impl FnMut() -> f64) -> f64 {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let rate = measure();
        assert!(
            rate <= 110e6,
            "metered rate {rate} bit/s is above 100 Mbit/s + 10%"
        );
        runs.push(rate);
        if rate >= 90e6 {
            return rate;
        }
    }
    panic!("metered rate never reached 100 Mbit/s - 10%: {runs:?} bit/s");
}

/// `iperf3 -c target` on host `client` to a one-off server on host `server`
/// bound to `bind`; returns the receiver's bit/s.
fn iperf3_between(
    lab: &Lab,
    client: usize,
    server: usize,
    bind: &str,
    target: &str,
    seconds: u32,
) -> f64 {
    lab.hosts[server]
        .spawn(&["iperf3", "-s", "-1", "-B", bind])
        .unwrap();
    // The one-off server needs a moment to listen; retry the client until it connects.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = lab.hosts[client]
            .capture(&[
                "iperf3",
                "-c",
                target,
                "-t",
                &seconds.to_string(),
                "-O",
                "1",
                "-J",
            ])
            .unwrap();
        // iperf3 -J may exit 0 with an "error" report (e.g. connection refused).
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        if out.success && v.get("error").is_none() {
            break out.stdout;
        }
        assert!(Instant::now() < deadline, "iperf3 never connected: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no receiver rate in iperf3's report: {out}"))
}

#[test]
fn iperf3_through_a_100_mbit_meter_measures_100_mbit_and_dscp_is_marked() {
    let lab = lab(&QOS_HOSTS, &two_hosts());

    let unlimited = iperf3(&lab, 3);

    // Precise errors for bad meters; the running state stays.
    let mut bad = two_hosts();
    bad.qos = vec![QosSpec {
        port: Some("client".into()),
        floating_ip: None,
        ingress: None,
        egress: Some(MeterSpec {
            rate_kbps: 100_000,
            burst_bytes: 1000,
        }),
        dscp: None,
    }];
    let msg = lab.apply_err(&bad);
    assert!(msg.contains("smaller than one maximum-size frame"), "{msg}");

    let mut limited = two_hosts();
    limited.qos = vec![QosSpec {
        port: Some("client".into()),
        floating_ip: None,
        ingress: None,
        egress: Some(MeterSpec {
            rate_kbps: 100_000,
            // 80 ms at the rate: TCP keeps the pipe full through the policer,
            // and over the 5 s measured the burst adds at most 1.6 %.
            burst_bytes: 1_000_000,
        }),
        dscp: Some(46),
    }];
    lab.apply(&limited);
    let metered = within_10_percent_of_100_mbit(|| iperf3(&lab, 5));
    let meters = qos_stats(&lab);
    eprintln!(
        "iperf3: unlimited {unlimited:.0} bit/s, 100 Mbit/s meter {metered:.0} bit/s; {meters:?}"
    );
    assert!(
        unlimited > 1.5 * metered,
        "without the meter ({unlimited}) not clearly faster than with it ({metered})"
    );
    let m = &meters[0];
    assert_eq!(m.meter, "client/egress");
    assert!(m.conformed_packets > 0 && m.dropped_packets > 0, "{m:?}");

    // DSCP 46 (EF) = TOS 0xb8 on what the server receives.
    let capture = std::thread::scope(|s| {
        let dump = s.spawn(|| {
            lab.hosts[1]
                .capture(&[
                    "timeout", "10", "tcpdump", "-l", "-n", "-v", "-c", "1", "-i", "eth0", "icmp",
                ])
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(1500));
        lab.hosts[0]
            .exec(&["ping", "-c", "3", "-i", "0.3", "10.0.1.11"])
            .unwrap();
        dump.join().unwrap()
    });
    assert!(
        capture.stdout.contains("tos 0xb8"),
        "receiver capture shows no DSCP 46: {capture:?}"
    );
}

/// Frames of a pcap file written so far (a partial last record is ignored).
fn pcap_frames(path: &std::path::Path) -> Vec<Vec<u8>> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(mut reader) = pcap_file::pcap::PcapReader::new(file) else {
        return Vec::new();
    };
    let mut frames = Vec::new();
    while let Some(Ok(p)) = reader.next_packet() {
        frames.push(p.data.into_owned());
    }
    frames
}

/// Starts `tcpdump -w file filter` on `host`'s eth0 and waits until it listens.
fn start_capture(host: &NetnsHost, dir: &std::path::Path, name: &str, filter: &str) -> PathBuf {
    let file = dir.join(format!("{name}.pcap"));
    let log = dir.join(format!("{name}.log"));
    host.spawn(&[
        "sh",
        "-c",
        &format!(
            "exec tcpdump -U -n -i eth0 -w {} {filter} 2>{}",
            file.display(),
            log.display()
        ),
    ])
    .unwrap();
    wait_for(
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")
        },
        "tcpdump to listen",
    );
    file
}

fn wait_frames(path: &std::path::Path, n: usize) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    wait_for(
        || {
            frames = pcap_frames(path);
            frames.len() >= n
        },
        &format!("{n} frames in {}", path.display()),
    );
    frames
}

/// The inner frames of ERSPAN type II packets of session `session`.
fn erspan_inner(frames: &[Vec<u8>], session: u16) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|f| {
            assert_eq!(&f[12..14], &[0x08, 0x00], "outer IPv4");
            assert_eq!(f[23], 47, "GRE");
            assert_eq!(&f[36..38], &[0x88, 0xbe], "ERSPAN type II");
            assert_eq!(f[42] >> 4, 1, "ERSPAN version 1 (type II)");
            assert_eq!(u16::from_be_bytes([f[44], f[45]]) & 0x3ff, session);
            f[50..].to_vec()
        })
        .collect()
}

const MIRROR_HOSTS: [HostSpec; 3] = [
    ("client", "02:00:00:00:00:10", "10.0.1.10/24"),
    ("server", "02:00:00:00:00:11", "10.0.1.11/24"),
    ("collector", "02:00:00:00:00:12", ""),
];

fn mirror_state(target: MirrorTarget) -> DesiredState {
    let mut s = two_hosts();
    s.ports.push(PortSpec {
        name: "collector".into(),
        switch: "a".into(),
        interface: "dp2".into(),
        mac: None,
        ips: vec![],
        port_security: false,
    });
    s.mirrors = vec![MirrorSpec {
        name: "tap".into(),
        ports: vec!["client".into()],
        direction: MirrorDirection::Both,
        filter: Some(MirrorFilter {
            protocol: Some("icmp".into()),
            cidr: Some("10.0.1.0/24".into()),
        }),
        target,
    }];
    s
}

/// Pings client → server (small and full-size frames) while capturing on
/// the client and on the collector; returns (client frames, collector frames).
fn ping_and_capture(
    lab: &Lab,
    dir: &std::path::Path,
    round: &str,
    collector_filter: &str,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let sent = start_capture(&lab.hosts[0], dir, &format!("client-{round}"), "icmp");
    let seen = start_capture(
        &lab.hosts[2],
        dir,
        &format!("collector-{round}"),
        collector_filter,
    );
    for size in ["56", "1472"] {
        let out = lab.hosts[0]
            .exec(&["ping", "-c", "5", "-i", "0.2", "-s", size, "10.0.1.11"])
            .unwrap();
        // Forwarding is unaffected by the mirror.
        assert!(out.stdout.contains(" 0% packet loss"), "{out:?}");
    }
    // 10 requests out, 10 replies in.
    (wait_frames(&sent, 20), wait_frames(&seen, 20))
}

fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

#[test]
fn mirrored_frames_reach_the_collector_byte_identical() {
    let erspan = MirrorTarget::Erspan {
        interface: "dp2".into(),
        src_mac: "02:00:00:00:00:fe".into(),
        dst_mac: "02:00:00:00:00:12".into(),
        src_ip: "198.18.0.1".into(),
        dst_ip: "198.18.0.2".into(),
        session_id: 7,
    };
    let lab = lab(&MIRROR_HOSTS, &mirror_state(erspan));
    let dir = tempfile::tempdir().unwrap();

    // Remote collector, GRE / ERSPAN type II.
    let (sent, seen) = ping_and_capture(&lab, dir.path(), "erspan", "proto gre");
    let inner = erspan_inner(&seen, 7);
    assert_eq!(inner.len(), 20, "only the 20 ICMP frames are mirrored");
    assert_eq!(
        sorted(inner),
        sorted(sent.clone()),
        "inner frames == what the client sent and received"
    );
    assert!(
        sent.iter().any(|f| f.len() == 1514),
        "full-size frames were mirrored too"
    );
    // An independent decoder agrees on the GRE layer (Debian's tcpdump 4.99.3
    // stops at protocol 0x88be; Wireshark decodes the ERSPAN II header).
    let decoded = lab.hosts[2]
        .exec(&[
            "tcpdump",
            "-n",
            "-r",
            &dir.path()
                .join("collector-erspan.pcap")
                .display()
                .to_string(),
        ])
        .unwrap()
        .stdout;
    for seq in 1..=20 {
        let line = format!("IP 198.18.0.1 > 198.18.0.2: GREv0, seq {seq}, length ");
        assert!(decoded.contains(&line), "no {line:?} in {decoded}");
    }
    assert_eq!(decoded.matches("gre-proto-0x88be").count(), 20, "{decoded}");
    let stats = mirror_stats(&lab);
    assert_eq!(stats[0].mirrored_packets, 20, "{stats:?}");

    // A local port as the target: the copies arrive unchanged.
    lab.apply(&mirror_state(MirrorTarget::Port {
        port: "collector".into(),
    }));
    let (sent, seen) = ping_and_capture(&lab, dir.path(), "local", "icmp");
    assert_eq!(sorted(seen), sorted(sent));

    // Bad sessions are rejected precisely.
    let msg = lab.apply_err(&mirror_state(MirrorTarget::Port {
        port: "client".into(),
    }));
    assert!(msg.contains("is also a source"), "{msg}");
}

const NAT64_HOSTS: [HostSpec; 2] = [
    ("v6client", "02:00:00:00:00:10", "10.0.1.10/24"),
    ("v4server", "02:00:00:00:00:11", "198.18.1.10/24"),
];

/// An IPv6 client on switch a (fd00:1::/64), an IPv4 server on switch ext
/// (198.18.1.0/24), router r with NAT64 from pool 198.18.1.100.
fn nat64_state() -> DesiredState {
    let sw = |name: &str, subnet: &str, subnet6: Option<&str>| SwitchSpec {
        name: name.into(),
        subnet: subnet.into(),
        vlan: None,
        subnet6: subnet6.map(Into::into),
        dhcp: None,
    };
    let mut client = port("v6client", "dp0", "02:00:00:00:00:10", "10.0.1.10");
    client.ips.push("fd00:1::10".into());
    let mut server = port("v4server", "dp1", "02:00:00:00:00:11", "198.18.1.10");
    server.switch = "ext".into();
    DesiredState {
        switches: vec![
            sw("a", "10.0.1.0/24", Some("fd00:1::/64")),
            sw("ext", "198.18.1.0/24", None),
        ],
        ports: vec![client, server],
        routers: vec![RouterSpec {
            name: "r".into(),
            ports: vec![
                RouterPortSpec {
                    switch: "a".into(),
                    mac: "02:00:00:00:ff:01".into(),
                    ip: "10.0.1.1".into(),
                    ip6: Some("fd00:1::1".into()),
                },
                RouterPortSpec {
                    switch: "ext".into(),
                    mac: "02:00:00:00:ff:02".into(),
                    ip: "198.18.1.1".into(),
                    ip6: None,
                },
            ],
            static_routes: vec![],
        }],
        nat64: vec![Nat64Spec {
            router: "r".into(),
            prefix: None,
            pool: vec!["198.18.1.100".into()],
            port_min: None,
            port_max: None,
        }],
        ..DesiredState::default()
    }
}

#[test]
fn nat64_ipv6_client_reaches_ipv4_server_over_tcp_udp_and_ping() {
    nat64_client_reaches_server(&lab(&NAT64_HOSTS, &nat64_state()));
}

/// The same with two workers: each session's pool port is chosen so the
/// IPv4 replies steer back to the worker holding it.
#[test]
fn nat64_with_two_workers() {
    nat64_client_reaches_server(&lab_with(&NAT64_HOSTS, &nat64_state(), &["--workers", "2"]));
}

fn nat64_client_reaches_server(lab: &Lab) {
    let (client, server) = (&lab.hosts[0], &lab.hosts[1]);
    client
        .sh(
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.eth0.disable_ipv6=0 \
             && ip -6 addr add fd00:1::10/64 dev eth0 nodad \
             && ip -6 route add 64:ff9b::/96 via fd00:1::1",
        )
        .unwrap();
    server.add_route("default", "198.18.1.1").unwrap();
    // 198.18.1.10 embedded in the well-known prefix.
    let target = "64:ff9b::c612:10a";

    // ICMPv6 echo ↔ ICMP echo.
    let out = client
        .exec(&["ping", "-6", "-c", "3", "-i", "0.3", "-W", "5", target])
        .unwrap();
    assert!(out.stdout.contains(" 0% packet loss"), "{out:?}");

    // TCP: curl -6 to a real HTTP server socket in the IPv4 namespace, which
    // records the peer address it sees.
    let listener = in_netns(server.name(), || {
        std::net::TcpListener::bind("198.18.1.10:80").unwrap()
    });
    let peer = std::thread::scope(|s| {
        let srv = s.spawn(|| {
            use std::io::{BufRead, BufReader, Write};
            let (mut conn, peer) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            let body = "hello from the IPv4 server\n";
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            peer
        });
        let out = client
            .exec(&[
                "curl",
                "-6",
                "-s",
                "-m",
                "10",
                &format!("http://[{target}]/"),
            ])
            .unwrap();
        assert_eq!(out.stdout, "hello from the IPv4 server\n");
        srv.join().unwrap()
    });
    assert_eq!(
        peer.ip().to_string(),
        "198.18.1.100",
        "the server sees the pool address"
    );

    // UDP both ways.
    let udp = in_netns(server.name(), || {
        std::net::UdpSocket::bind("198.18.1.10:5353").unwrap()
    });
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let seen = std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let mut buf = [0u8; 64];
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            udp.send_to(&buf[..n], from).unwrap();
            from
        });
        let echoed = in_netns(client.name(), || {
            let sock = std::net::UdpSocket::bind("[fd00:1::10]:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            sock.send_to(b"over nat64", format!("[{target}]:5353"))
                .unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            assert_eq!(from.ip().to_string(), target);
            buf[..n].to_vec()
        });
        assert_eq!(echoed, b"over nat64");
        srv.join().unwrap()
    });
    assert_eq!(seen.ip().to_string(), "198.18.1.100");

    // A closed UDP port: the server's ICMP port unreachable comes back as
    // ICMPv6 port unreachable, and the client's socket sees "refused".
    let refused = in_netns(client.name(), || {
        let sock = std::net::UdpSocket::bind("[fd00:1::10]:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.connect(format!("[{target}]:5354")).unwrap();
        sock.send(b"anyone?").unwrap();
        let mut buf = [0u8; 16];
        sock.recv(&mut buf).unwrap_err()
    });
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused:?}"
    );

    // IPv4-initiated traffic to the pool has no session: dropped and counted.
    in_netns(server.name(), || {
        let sock = std::net::UdpSocket::bind("198.18.1.10:0").unwrap();
        sock.send_to(b"unsolicited", "198.18.1.100:40000").unwrap();
    });
    let stats = || match lab.request(&Request::Stats) {
        Response::Stats { stats } => stats,
        other => panic!("{other:?}"),
    };
    wait_for(
        || {
            stats()
                .port("dp1")
                .is_some_and(|p| p.drops.get("nat64_no_session") == Some(&1))
        },
        "the unsolicited datagram to be dropped as nat64_no_session",
    );
    let stats = stats();
    assert!(stats.outcomes["nat64_translated_6to4"] > 0, "{stats:?}");
    assert!(stats.outcomes["nat64_translated_4to6"] > 0, "{stats:?}");

    // Wrong family in the pool: rejected precisely.
    let mut bad = nat64_state();
    bad.nat64[0].pool = vec!["fd00:1::100".into()];
    let msg = lab.apply_err(&bad);
    assert!(
        msg.contains("pool address \"fd00:1::100\" is not IPv4"),
        "{msg}"
    );
}

const CHAIN_HOSTS: [HostSpec; 3] = [
    ("client", "02:00:00:00:00:10", "10.0.1.10/24"),
    ("server", "02:00:00:00:00:11", "10.0.2.10/24"),
    ("firewall", "02:00:00:00:00:12", "10.0.3.10/24"),
];

/// Client, server and a firewall VM on three switches of router r; traffic
/// from the clients' switch to the servers' subnet is rerouted through the
/// firewall, which routes it back to r.
fn chain_state(extra: Vec<RouterPolicySpec>) -> DesiredState {
    let sw = |name: &str, subnet: &str| SwitchSpec {
        name: name.into(),
        subnet: subnet.into(),
        vlan: None,
        subnet6: None,
        dhcp: None,
    };
    let gw = |switch: &str, mac: &str, ip: &str| RouterPortSpec {
        switch: switch.into(),
        mac: mac.into(),
        ip: ip.into(),
        ip6: None,
    };
    let mut server = port("server", "dp1", "02:00:00:00:00:11", "10.0.2.10");
    server.switch = "b".into();
    let mut fw = port("firewall", "dp2", "02:00:00:00:00:12", "10.0.3.10");
    fw.switch = "s".into();
    // A service VM forwards others' packets: no source checks on its port.
    fw.port_security = false;
    let mut policies = vec![RouterPolicySpec {
        router: "r".into(),
        priority: 100,
        from_switch: Some("a".into()),
        src_cidr: Some("10.0.1.0/24".into()),
        dst_cidr: Some("10.0.2.0/24".into()),
        protocol: None,
        action: PolicyAction::Reroute,
        next_hop: Some("10.0.3.10".into()),
    }];
    policies.extend(extra);
    DesiredState {
        switches: vec![
            sw("a", "10.0.1.0/24"),
            sw("b", "10.0.2.0/24"),
            sw("s", "10.0.3.0/24"),
        ],
        ports: vec![
            port("client", "dp0", "02:00:00:00:00:10", "10.0.1.10"),
            server,
            fw,
        ],
        routers: vec![RouterSpec {
            name: "r".into(),
            ports: vec![
                gw("a", "02:00:00:00:ff:01", "10.0.1.1"),
                gw("b", "02:00:00:00:ff:02", "10.0.2.1"),
                gw("s", "02:00:00:00:ff:03", "10.0.3.1"),
            ],
            static_routes: vec![],
        }],
        router_policies: policies,
        ..DesiredState::default()
    }
}

/// Packets the host's kernel forwarded (`Ip: ForwDatagrams`).
fn forwarded(host: &NetnsHost) -> u64 {
    let snmp = host.sh("cat /proc/net/snmp").unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// One TCP exchange client → server:7000; returns the client address the server saw.
fn tcp_exchange(lab: &Lab) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = in_netns(lab.hosts[1].name(), || {
        std::net::TcpListener::bind("10.0.2.10:7000").unwrap()
    });
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let (mut c, peer) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            c.write_all(&buf).unwrap();
            peer
        });
        in_netns(lab.hosts[0].name(), || {
            let addr: std::net::SocketAddr = "10.0.2.10:7000".parse().unwrap();
            let mut c =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"chain").unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"chain");
        });
        srv.join().unwrap()
    })
}

fn policy_stats(lab: &Lab) -> Vec<PolicyStats> {
    match lab.request(&Request::PolicyStats) {
        Response::PolicyStats { policies } => policies,
        other => panic!("{other:?}"),
    }
}

#[test]
fn service_chain_reroutes_through_the_firewall_vm() {
    let lab = lab(&CHAIN_HOSTS, &chain_state(vec![]));
    let (client, server, fw) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    client.add_route("default", "10.0.1.1").unwrap();
    server.add_route("default", "10.0.2.1").unwrap();
    fw.add_route("default", "10.0.3.1").unwrap();
    fw.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 \
           net.ipv4.conf.eth0.send_redirects=0 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0")
        .unwrap();

    let before = forwarded(fw);
    let out = client
        .exec(&["ping", "-c", "3", "-i", "0.3", "-W", "5", "10.0.2.10"])
        .unwrap();
    assert!(out.stdout.contains(" 0% packet loss"), "{out:?}");
    let peer = tcp_exchange(&lab);
    assert_eq!(peer.ip().to_string(), "10.0.1.10");
    let through_fw = forwarded(fw) - before;
    // 3 echo requests + the client's TCP segments (handshake, data, acks, fin).
    assert!(
        through_fw >= 3 + 4,
        "the firewall VM forwarded only {through_fw} packets"
    );
    let hits = policy_stats(&lab);
    assert!(hits[0].hits >= 7, "{hits:?}");

    // A higher-priority drop policy for ICMP: ping dies, TCP still takes the chain.
    lab.apply(&chain_state(vec![RouterPolicySpec {
        router: "r".into(),
        priority: 200,
        from_switch: Some("a".into()),
        src_cidr: None,
        dst_cidr: Some("10.0.2.0/24".into()),
        protocol: Some("icmp".into()),
        action: PolicyAction::Drop,
        next_hop: None,
    }]));
    let out = client
        .capture(&["ping", "-c", "2", "-i", "0.3", "-W", "1", "10.0.2.10"])
        .unwrap();
    assert!(!out.success, "ping passed a drop policy: {out:?}");
    let before = forwarded(fw);
    tcp_exchange(&lab);
    assert!(
        forwarded(fw) > before,
        "TCP no longer passes the firewall VM"
    );

    // Same priority and match with different actions: rejected precisely.
    let mut conflict = chain_state(vec![]);
    let mut twin = conflict.router_policies[0].clone();
    twin.action = PolicyAction::Allow;
    twin.next_hop = None;
    conflict.router_policies.push(twin);
    let msg = lab.apply_err(&conflict);
    assert!(
        msg.contains("same priority and match, different actions"),
        "{msg}"
    );
}

const FIP_HOSTS: [HostSpec; 2] = [
    ("vm", "02:00:00:00:00:10", "10.0.1.10/24"),
    ("outside", "02:00:00:00:00:11", "198.18.0.10/24"),
];

/// vm (10.0.1.10) behind router r with floating IP 198.18.0.50; an
/// external host on 198.18.0.0/24.
fn fip_state(limit: Option<MeterSpec>) -> DesiredState {
    let sw = |name: &str, subnet: &str| SwitchSpec {
        name: name.into(),
        subnet: subnet.into(),
        vlan: None,
        subnet6: None,
        dhcp: None,
    };
    let mut outside = port("outside", "dp1", "02:00:00:00:00:11", "198.18.0.10");
    outside.switch = "ext".into();
    DesiredState {
        switches: vec![sw("a", "10.0.1.0/24"), sw("ext", "198.18.0.0/24")],
        ports: vec![port("vm", "dp0", "02:00:00:00:00:10", "10.0.1.10"), outside],
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
                    mac: "02:00:00:00:ff:02".into(),
                    ip: "198.18.0.1".into(),
                    ip6: None,
                },
            ],
            static_routes: vec![],
        }],
        nat: vec![keel_dataplane::model::NatRuleSpec {
            router: "r".into(),
            kind: keel_dataplane::model::NatKind::DnatAndSnat,
            external_ip: "198.18.0.50".into(),
            logical_ip: "10.0.1.10".into(),
            protocol: None,
            external_port: None,
            logical_port: None,
            port_min: None,
            port_max: None,
        }],
        qos: limit
            .map(|m| {
                vec![QosSpec {
                    port: None,
                    floating_ip: Some("198.18.0.50".into()),
                    ingress: Some(m),
                    egress: None,
                    dscp: None,
                }]
            })
            .unwrap_or_default(),
        ..DesiredState::default()
    }
}

#[test]
fn iperf3_to_a_floating_ip_with_a_100_mbit_ingress_meter_measures_100_mbit() {
    let lab = lab(&FIP_HOSTS, &fip_state(None));
    lab.hosts[0].add_route("default", "10.0.1.1").unwrap();
    lab.hosts[1].add_route("default", "198.18.0.1").unwrap();
    let unlimited = iperf3_between(&lab, 1, 0, "10.0.1.10", "198.18.0.50", 3);
    lab.apply(&fip_state(Some(MeterSpec {
        rate_kbps: 100_000,
        burst_bytes: 1_000_000,
    })));
    let metered =
        within_10_percent_of_100_mbit(|| iperf3_between(&lab, 1, 0, "10.0.1.10", "198.18.0.50", 5));
    let meters = qos_stats(&lab);
    eprintln!("iperf3 to floating IP: unlimited {unlimited:.0} bit/s, 100 Mbit/s meter {metered:.0} bit/s; {meters:?}");
    assert!(
        unlimited > 1.5 * metered,
        "unlimited {unlimited} vs {metered}"
    );
    assert_eq!(meters[0].meter, "198.18.0.50/ingress");
    assert!(meters[0].dropped_packets > 0, "{meters:?}");

    // Not a floating IP: rejected precisely.
    let mut bad = fip_state(None);
    bad.qos = vec![QosSpec {
        floating_ip: Some("198.18.0.99".into()),
        ingress: Some(MeterSpec {
            rate_kbps: 1000,
            burst_bytes: 10_000,
        }),
        ..QosSpec::default()
    }];
    let msg = lab.apply_err(&bad);
    assert!(
        msg.contains("is not the external IPv4 address of a dnat_and_snat"),
        "{msg}"
    );
}
