//! L4 load balancer: configuration errors and forwarding through the
//! pipeline (selection, DNAT with checksums, affinity, un-DNAT of replies,
//! counters, member removal).

use std::net::Ipv4Addr;

use crate::config::{compile, ConfigError};
use crate::conntrack::tcp::{ACK, SYN};
use crate::lb4::{Lb4Error, LbHash, LbMemberSpec, LbProtocol, LoadBalancerSpec};
use crate::model::{DesiredState, PortSpec};
use crate::packet::build::ipv4;
use crate::packet::checksum::{accumulate, finish, internet_checksum};
use crate::packet::headers::Mac;
use crate::pipeline::{process, Learned, NoTrace, RecordTrace, Verdict};
use crate::tables::Tables;
use crate::testutil::{interfaces, topology};

const VM1: Mac = [2, 0, 0, 0, 0, 1];
const GW_A: Mac = [2, 0, 0, 0, 0xff, 1];
const GW_B: Mac = [2, 0, 0, 0, 0xff, 2];
const VM3: Mac = [2, 0, 0, 0, 0, 3];
const VM5: Mac = [2, 0, 0, 0, 0, 5];
const VIP: &str = "10.0.1.100";

fn member(ip: &str, weight: u16) -> LbMemberSpec {
    LbMemberSpec {
        ip: ip.into(),
        port: 8080,
        weight,
    }
}

fn lb(protocol: LbProtocol, members: Vec<LbMemberSpec>) -> LoadBalancerSpec {
    LoadBalancerSpec {
        name: "web".into(),
        router: "r".into(),
        vip: VIP.into(),
        protocol,
        port: 80,
        hash: LbHash::default(),
        monitor: None,
        members,
    }
}

/// The shared topology plus vm5 (10.0.2.11) next to vm3 on switch b, and a
/// TCP load balancer 10.0.1.100:80 → vm3, vm5 port 8080.
fn state(members: &[&str]) -> DesiredState {
    let mut s = topology();
    s.ports.push(PortSpec {
        name: "vm5".into(),
        switch: "b".into(),
        interface: "p2".into(),
        mac: Some("02:00:00:00:00:05".into()),
        ips: vec!["10.0.2.11".into()],
        port_security: true,
    });
    s.load_balancers = vec![lb(
        LbProtocol::Tcp,
        members.iter().map(|m| member(m, 1)).collect(),
    )];
    s
}

fn err(s: &DesiredState) -> Lb4Error {
    match compile(s, &interfaces(), 1) {
        Err(ConfigError::Lb4(e)) => e,
        other => panic!("expected a load-balancer error, got {other:?}"),
    }
}

#[test]
fn bad_load_balancers_are_rejected_precisely() {
    let ok = state(&["10.0.2.10", "10.0.2.11"]);
    assert!(compile(&ok, &interfaces(), 1).is_ok());

    let mut s = ok.clone();
    s.load_balancers[0].vip = "172.16.0.1".into();
    assert!(matches!(err(&s), Lb4Error::VipOffRouter { .. }));
    assert!(err(&s).to_string().contains("172.16.0.1"));

    let mut s = ok.clone();
    s.load_balancers[0].vip = "10.0.1.10".into(); // vm1's address
    assert!(matches!(err(&s), Lb4Error::VipInUse { .. }));

    let mut s = ok.clone();
    s.load_balancers[0].vip = "fd00:1::100".into();
    assert!(matches!(err(&s), Lb4Error::BadAddress { .. }));

    let mut s = ok.clone();
    let mut second = s.load_balancers[0].clone();
    second.name = "web2".into();
    s.load_balancers.push(second.clone());
    let e = err(&s);
    assert!(matches!(e, Lb4Error::DuplicateVip { port: 80, .. }), "{e}");
    assert!(e.to_string().contains("\"web\""), "{e}");
    // Same VIP and port over UDP is another service.
    s.load_balancers[1].protocol = LbProtocol::Udp;
    assert!(compile(&s, &interfaces(), 1).is_ok());
    // Same name twice.
    s.load_balancers[1].name = "web".into();
    assert!(matches!(err(&s), Lb4Error::DuplicateName { .. }));

    let mut s = ok.clone();
    s.load_balancers[0].members.clear();
    assert!(matches!(err(&s), Lb4Error::NoMembers { .. }));
    let mut s = ok.clone();
    for m in &mut s.load_balancers[0].members {
        m.weight = 0;
    }
    assert!(matches!(err(&s), Lb4Error::NoMembers { .. }));

    let mut s = ok.clone();
    s.load_balancers[0].members.push(member("192.168.7.7", 1));
    assert!(matches!(err(&s), Lb4Error::MemberOffRouter { .. }));

    let mut s = ok.clone();
    s.load_balancers[0].members.push(member("10.0.2.10", 3));
    assert!(matches!(err(&s), Lb4Error::DuplicateMember { .. }));

    let mut s = ok.clone();
    s.load_balancers[0].port = 0;
    assert!(matches!(
        err(&s),
        Lb4Error::PortOutOfRange { what: "VIP", .. }
    ));
    let mut s = ok.clone();
    s.load_balancers[0].members[0].port = 0;
    assert!(matches!(
        err(&s),
        Lb4Error::PortOutOfRange { what: "member", .. }
    ));

    let mut s = ok.clone();
    s.load_balancers[0].router = "nope".into();
    assert!(matches!(err(&s), Lb4Error::UnknownRouter { .. }));

    // Ports above 65535 and unknown fields fail at parse time.
    let json = r#"{"name":"x","router":"r","vip":"10.0.1.100","protocol":"tcp","port":70000,"members":[]}"#;
    assert!(serde_json::from_str::<LoadBalancerSpec>(json).is_err());
    let json =
        r#"{"name":"x","router":"r","vip":"10.0.1.100","protocol":"sctp","port":7,"members":[]}"#;
    assert!(serde_json::from_str::<LoadBalancerSpec>(json).is_err());
    let json = r#"{"name":"x","router":"r","vip":"10.0.1.100","protocol":"tcp","port":7,"members":[{"ip":"10.0.2.10","port":1,"wieght":2}]}"#;
    assert!(serde_json::from_str::<LoadBalancerSpec>(json).is_err());
}

#[test]
fn the_vip_is_answered_by_the_gateway_mac() {
    let t = compile(&state(&["10.0.2.10"]), &interfaces(), 1).unwrap();
    let vip: Ipv4Addr = VIP.parse().unwrap();
    assert_eq!(t.switches[0].arp.get(&u32::from(vip)), Some(&GW_A));
}

fn l4(
    dst: Mac,
    src: Mac,
    sip: &str,
    dip: &str,
    proto: u8,
    ports: (u16, u16),
    flags: u8,
) -> Vec<u8> {
    let mut h = vec![0u8; if proto == 6 { 24 } else { 12 }];
    h[0..2].copy_from_slice(&ports.0.to_be_bytes());
    h[2..4].copy_from_slice(&ports.1.to_be_bytes());
    let sip: Ipv4Addr = sip.parse().unwrap();
    let dip: Ipv4Addr = dip.parse().unwrap();
    let len = u16::try_from(h.len()).unwrap();
    let sum_at = if proto == 6 {
        h[12] = 0x50;
        h[13] = flags;
        h[14..16].copy_from_slice(&65535u16.to_be_bytes());
        h[20..24].copy_from_slice(b"ping");
        16
    } else {
        h[4..6].copy_from_slice(&len.to_be_bytes());
        h[8..12].copy_from_slice(b"ping");
        6
    };
    let mut sum = accumulate(0, &sip.octets());
    sum = accumulate(sum, &dip.octets());
    sum = accumulate(sum, &[0, proto]);
    sum = accumulate(sum, &len.to_be_bytes());
    sum = accumulate(sum, &h);
    h[sum_at..sum_at + 2].copy_from_slice(&finish(sum).to_be_bytes());
    ipv4(dst, src, None, sip, dip, 64, proto, &h)
}

/// IPv4 header and L4 checksum (pseudo-header included) both verify.
fn checksums_ok(f: &[u8]) -> bool {
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let seg = &f[34..14 + total];
    let mut sum = accumulate(0, &f[26..34]);
    sum = accumulate(sum, &[0, f[23]]);
    sum = accumulate(sum, &u16::try_from(seg.len()).unwrap().to_be_bytes());
    sum = accumulate(sum, seg);
    finish(sum) == 0 && internet_checksum(&f[14..34]) == 0
}

struct Rig {
    t: Tables,
    learned: Learned,
}

impl Rig {
    fn new(s: &DesiredState) -> Rig {
        let mut learned = Learned::new(64).with_connections(4096);
        learned.sync(1);
        Rig {
            t: compile(s, &interfaces(), 1).unwrap(),
            learned,
        }
    }

    fn apply(&mut self, s: &DesiredState) {
        self.fold();
        let g = self.t.generation + 1;
        self.t = compile(s, &interfaces(), g).unwrap();
        self.learned.sync(g);
    }

    fn run(&mut self, in_port: u16, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        let mut len = frame.len();
        let d = process(
            &self.t,
            &mut self.learned,
            in_port,
            &mut buf,
            &mut len,
            &mut NoTrace,
        );
        buf.truncate(len);
        (d.verdict, buf)
    }

    fn fold(&mut self) {
        self.learned.stateful.lb.fold(&self.t.stateful.lb);
    }

    /// Client vm1:sport → VIP:80: the member address the router sent it to.
    fn connect(&mut self, proto: u8, sport: u16, flags: u8) -> [u8; 4] {
        let (v, out) = self.run(
            0,
            &l4(GW_A, VM1, "10.0.1.10", VIP, proto, (sport, 80), flags),
        );
        assert_eq!(v, Verdict::Unicast { port: 2 }, "sport {sport}");
        assert_eq!(&out[26..30], &[10, 0, 1, 10], "the member sees the client");
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), 8080);
        assert!(checksums_ok(&out), "DNATed checksums");
        let dst: [u8; 4] = out[30..34].try_into().unwrap();
        let expect_mac = if dst == [10, 0, 2, 10] { VM3 } else { VM5 };
        assert_eq!(&out[0..6], &expect_mac);
        dst
    }

    /// The member's reply to vm1:sport; asserts it leaves as VIP:80.
    fn reply(&mut self, proto: u8, member: [u8; 4], sport: u16) {
        let ip = Ipv4Addr::from(member).to_string();
        let mac = if member == [10, 0, 2, 10] { VM3 } else { VM5 };
        let (v, back) = self.run(
            2,
            &l4(GW_B, mac, &ip, "10.0.1.10", proto, (8080, sport), SYN | ACK),
        );
        assert_eq!(v, Verdict::Unicast { port: 0 });
        assert_eq!(&back[26..30], &[10, 0, 1, 100], "un-DNATed to the VIP");
        assert_eq!(u16::from_be_bytes([back[34], back[35]]), 80);
        assert!(checksums_ok(&back), "un-DNATed checksums");
    }
}

#[test]
fn source_ip_hashing_keeps_a_clients_connections_together() {
    let mut s = state(&["10.0.2.10", "10.0.2.11"]);
    s.load_balancers[0].hash = LbHash::SourceIp;
    let mut r = Rig::new(&s);
    let first = r.connect(6, 40000, SYN);
    for sport in 40001..40100u16 {
        assert_eq!(r.connect(6, sport, SYN), first, "sport {sport}");
    }
}

#[test]
fn connections_spread_stick_and_survive_member_removal() {
    let both = state(&["10.0.2.10", "10.0.2.11"]);
    let mut r = Rig::new(&both);
    let mut first = Vec::new();
    for sport in 40000..40200u16 {
        let m = r.connect(6, sport, SYN);
        r.reply(6, m, sport);
        // Later packets of the flow keep their member.
        assert_eq!(r.connect(6, sport, ACK), m);
        first.push((sport, m));
    }
    let on_vm3 = first.iter().filter(|(_, m)| *m == [10, 0, 2, 10]).count();
    assert!((60..140).contains(&on_vm3), "{on_vm3} of 200 on vm3");
    r.fold();
    let stats = r.t.stateful.lb.stats();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats.iter().map(|s| s.flows).sum::<u64>(), 200);
    assert_eq!(stats[0].flows, on_vm3 as u64);
    assert_eq!(stats.iter().map(|s| s.packets).sum::<u64>(), 600);

    // vm5 leaves the member set: established flows keep their member (vm5's
    // included, they drain); new flows only go to vm3, and clients vm3 had
    // would have stayed on vm3 anyway.
    r.apply(&state(&["10.0.2.10"]));
    for (sport, m) in &first {
        assert_eq!(r.connect(6, *sport, ACK), *m);
        r.reply(6, *m, *sport);
    }
    for sport in 50000..50100u16 {
        assert_eq!(r.connect(6, sport, SYN), [10, 0, 2, 10]);
    }
    r.fold();
    let stats = r.t.stateful.lb.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].flows, 100);
    // Packets of the old vm3 flows were found again under the new tables.
    assert_eq!(stats[0].packets, 100 + 2 * on_vm3 as u64);
}

#[test]
fn udp_request_and_response_pass_through_the_vip() {
    let mut s = state(&["10.0.2.10", "10.0.2.11"]);
    s.load_balancers[0].protocol = LbProtocol::Udp;
    let mut r = Rig::new(&s);
    let mut seen = [false; 2];
    for sport in 30000..30050u16 {
        let m = r.connect(17, sport, 0);
        r.reply(17, m, sport);
        assert_eq!(r.connect(17, sport, 0), m);
        seen[usize::from(m == [10, 0, 2, 11])] = true;
    }
    assert_eq!(seen, [true, true]);
    // TCP to the UDP VIP is not balanced: it stops at the router.
    let (v, _) = r.run(0, &l4(GW_A, VM1, "10.0.1.10", VIP, 6, (1234, 80), SYN));
    assert_eq!(
        v,
        Verdict::Drop(crate::counters::DropReason::RouterLocalUnsupported)
    );
    // The router answers pings to the VIP.
    let vip: Ipv4Addr = VIP.parse().unwrap();
    let echo = ipv4(
        GW_A,
        VM1,
        None,
        "10.0.1.10".parse().unwrap(),
        vip,
        64,
        1,
        &[8, 0, 0xf7, 0xfe, 0, 1, 0, 0],
    );
    let (v, back) = r.run(0, &echo);
    assert_eq!(v, Verdict::Reply);
    assert_eq!(&back[26..30], &vip.octets());
    assert_eq!(back[34], 0, "echo reply");
}

#[test]
fn trace_shows_the_lb_stage() {
    let r = Rig::new(&state(&["10.0.2.10", "10.0.2.11"]));
    let mut learned = Learned::new(64);
    learned.sync(1);
    let f = l4(GW_A, VM1, "10.0.1.10", VIP, 6, (40000, 80), SYN);
    let mut buf = vec![0u8; 2048];
    buf[..f.len()].copy_from_slice(&f);
    let mut len = f.len();
    let mut tr = RecordTrace::default();
    process(&r.t, &mut learned, 0, &mut buf, &mut len, &mut tr);
    let lb = tr.steps.iter().find(|s| s.stage == "lb").expect("lb stage");
    assert!(lb.decision.contains("\"web\""), "{}", lb.decision);
    assert!(lb.decision.contains("10.0.1.100:80"), "{}", lb.decision);
}

#[test]
fn monitors_are_checked_and_members_out_are_skipped() {
    let mut s = state(&["10.0.2.10", "10.0.2.11"]);
    let monitor = |interval_ms, timeout_ms, rise, fall| crate::lb4::LbMonitorSpec {
        kind: crate::lb4::ProbeKind::Tcp,
        interval_ms,
        timeout_ms,
        rise,
        fall,
    };
    for bad in [
        monitor(50, 10, 1, 1),
        monitor(1000, 2000, 1, 1),
        monitor(1000, 500, 0, 1),
        monitor(1000, 500, 1, 11),
    ] {
        s.load_balancers[0].monitor = Some(bad);
        assert!(matches!(err(&s), Lb4Error::BadMonitor { .. }), "{bad:?}");
    }
    let mut udp = s.clone();
    udp.load_balancers[0].protocol = LbProtocol::Udp;
    udp.load_balancers[0].monitor = Some(monitor(1000, 500, 1, 1));
    assert!(matches!(err(&udp), Lb4Error::BadMonitor { .. }));

    s.load_balancers[0].monitor = Some(monitor(1000, 500, 2, 3));
    let mut r = Rig::new(&s);
    let lb = &r.t.stateful.lb;
    assert_eq!(lb.monitors.len(), 1);
    let targets: Vec<(u32, Ipv4Addr)> = lb.monitors[0]
        .targets
        .iter()
        .map(|t| (t.slot, t.ip))
        .collect();
    assert_eq!(
        targets,
        [
            (0, Ipv4Addr::new(10, 0, 2, 10)),
            (1, Ipv4Addr::new(10, 0, 2, 11))
        ]
    );
    // vm3 out: every new connection goes to vm5, open ones stay.
    let kept = r.connect(6, 40000, SYN);
    r.reply(6, kept, 40000);
    r.t.stateful.lb.up[0].store(false, std::sync::atomic::Ordering::Relaxed);
    for sport in 41000..41100u16 {
        assert_eq!(r.connect(6, sport, SYN), [10, 0, 2, 11], "sport {sport}");
    }
    assert_eq!(
        r.connect(6, 40000, ACK),
        kept,
        "an open connection keeps its member"
    );
    // Both out: new connections are dropped, counted.
    r.t.stateful.lb.up[1].store(false, std::sync::atomic::Ordering::Relaxed);
    let (v, _) = r.run(0, &l4(GW_A, VM1, "10.0.1.10", VIP, 6, (42000, 80), SYN));
    assert_eq!(v, Verdict::Drop(crate::counters::DropReason::LbNoMemberUp));
    let stats = r.t.stateful.lb.stats();
    assert_eq!(stats[0].health, crate::lb4::MemberHealth::Down);
}

/// vm3 and vm5 behind the VIP over `protocol`, probed by `kind`.
fn monitored(protocol: LbProtocol, kind: crate::lb4::ProbeKind) -> DesiredState {
    let mut s = state(&["10.0.2.10", "10.0.2.11"]);
    s.load_balancers[0].protocol = protocol;
    s.load_balancers[0].monitor = Some(crate::lb4::LbMonitorSpec {
        kind,
        interval_ms: 1000,
        timeout_ms: 500,
        rise: 1,
        fall: 1,
    });
    s
}

#[test]
fn a_probe_answer_is_counted_and_reset() {
    use crate::lb4_health::{build_probe, probe_port, PROBE_LEN};
    let mut r = Rig::new(&monitored(LbProtocol::Tcp, crate::lb4::ProbeKind::Tcp));
    let gw: Ipv4Addr = "10.0.2.1".parse().unwrap();
    let vm5: Ipv4Addr = "10.0.2.11".parse().unwrap();
    // The probe the worker sends vm5 is a well-formed SYN.
    let mut probe = [0u8; PROBE_LEN];
    let n = build_probe(
        &mut probe,
        crate::lb4::ProbeKind::Tcp,
        VM5,
        GW_B,
        gw,
        vm5,
        probe_port(1).unwrap(),
        8080,
        7,
    );
    assert!(checksums_ok(&probe[..n]));
    // A ping probe is an echo request identified by the slot's number; the
    // echo reply is counted, not routed.
    let n = build_probe(
        &mut probe,
        crate::lb4::ProbeKind::Ping,
        VM5,
        GW_B,
        gw,
        vm5,
        probe_port(1).unwrap(),
        0,
        7,
    );
    assert_eq!(n, 42);
    assert_eq!(internet_checksum(&probe[34..42]), 0);
    let mut reply = probe[..n].to_vec();
    reply[0..6].copy_from_slice(&GW_B);
    reply[6..12].copy_from_slice(&VM5);
    reply[26..30].copy_from_slice(&[10, 0, 2, 11]);
    reply[30..34].copy_from_slice(&[10, 0, 2, 1]);
    reply[34] = 0; // echo reply
    reply[36..38].fill(0);
    let sum = internet_checksum(&reply[34..42]);
    reply[36..38].copy_from_slice(&sum.to_be_bytes());
    let (v, _) = r.run(2, &reply);
    assert_eq!(v, Verdict::Consumed);
    assert_eq!(r.t.stateful.lb.stats()[1].probes_answered, 1);
    // vm5's SYN-ACK to the router: counted, answered with a RST.
    let mut synack = l4(
        GW_B,
        VM5,
        "10.0.2.11",
        "10.0.2.1",
        6,
        (8080, probe_port(1).unwrap()),
        SYN | ACK,
    );
    synack[14 + 20 + 8..14 + 20 + 12].copy_from_slice(&8u32.to_be_bytes());
    let synack = {
        // The ack number changed: fix the TCP checksum.
        let mut f = synack;
        f[14 + 20 + 16..14 + 20 + 18].fill(0);
        let seg = f[34..].to_vec();
        let mut sum = accumulate(0, &[10, 0, 2, 11]);
        sum = accumulate(sum, &[10, 0, 2, 1]);
        sum = accumulate(sum, &[0, 6]);
        sum = accumulate(sum, &u16::try_from(seg.len()).unwrap().to_be_bytes());
        sum = accumulate(sum, &seg);
        f[50..52].copy_from_slice(&finish(sum).to_be_bytes());
        f
    };
    let (v, out) = r.run(2, &synack);
    assert_eq!(v, Verdict::Reply);
    assert_eq!(&out[0..6], &VM5);
    assert_eq!(&out[26..30], &[10, 0, 2, 1]);
    assert_eq!(&out[30..34], &[10, 0, 2, 11]);
    assert_eq!(out[47], crate::conntrack::tcp::RST);
    assert_eq!(&out[38..42], &8u32.to_be_bytes(), "sequence = their ack");
    assert!(checksums_ok(&out));
    let stats = r.t.stateful.lb.stats();
    assert_eq!(
        stats[1].probes_answered, 2,
        "the echo reply and the SYN-ACK"
    );
    assert_eq!(stats[0].probes_answered, 0);
    assert_eq!(stats[1].health, crate::lb4::MemberHealth::Up);
    // A SYN-ACK naming another member's slot is not taken for a probe.
    let (v, _) = r.run(
        2,
        &l4(
            GW_B,
            VM5,
            "10.0.2.11",
            "10.0.2.1",
            6,
            (8080, probe_port(0).unwrap()),
            SYN | ACK,
        ),
    );
    assert_ne!(v, Verdict::Reply);
    assert_eq!(r.t.stateful.lb.stats()[0].probes_answered, 0);
}

#[test]
fn a_floating_ip_on_the_vip_reaches_the_members() {
    use crate::model::{NatKind, NatRuleSpec};
    let mut s = state(&["10.0.2.10", "10.0.2.11"]);
    // 10.0.1.200 stands for the floating IP (the router answers it).
    s.nat.push(NatRuleSpec {
        router: "r".into(),
        kind: NatKind::DnatAndSnat,
        external_ip: "10.0.1.200".into(),
        logical_ip: VIP.into(),
        protocol: None,
        external_port: None,
        logical_port: None,
        port_min: None,
        port_max: None,
    });
    let mut r = Rig::new(&s);
    let mut seen = [0usize; 2];
    for sport in 43000..43040u16 {
        let (v, out) = r.run(
            0,
            &l4(GW_A, VM1, "10.0.1.10", "10.0.1.200", 6, (sport, 80), SYN),
        );
        assert_eq!(v, Verdict::Unicast { port: 2 }, "sport {sport}");
        assert!(checksums_ok(&out));
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), 8080);
        let member: [u8; 4] = out[30..34].try_into().unwrap();
        seen[usize::from(member == [10, 0, 2, 11])] += 1;
        // The member's answer leaves as the floating IP.
        let mac = if member == [10, 0, 2, 10] { VM3 } else { VM5 };
        let ip = Ipv4Addr::from(member).to_string();
        let (v, back) = r.run(
            2,
            &l4(GW_B, mac, &ip, "10.0.1.10", 6, (8080, sport), SYN | ACK),
        );
        assert_eq!(v, Verdict::Unicast { port: 0 });
        assert_eq!(&back[26..30], &[10, 0, 1, 200]);
        assert_eq!(u16::from_be_bytes([back[34], back[35]]), 80);
        assert!(checksums_ok(&back));
    }
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    r.fold();
    assert_eq!(
        r.t.stateful.lb.stats().iter().map(|s| s.flows).sum::<u64>(),
        40
    );
}

#[test]
fn a_client_on_the_members_subnet_is_answered_through_the_router() {
    let mut r = Rig::new(&state(&["10.0.2.11"]));
    // vm3 (10.0.2.10) shares switch b with the member vm5.
    let (v, out) = r.run(2, &l4(GW_B, VM3, "10.0.2.10", VIP, 6, (40000, 80), SYN));
    assert_eq!(v, Verdict::Unicast { port: 2 });
    assert_eq!(&out[0..6], &VM5);
    assert_eq!(&out[26..30], &[10, 0, 1, 100], "source: the VIP");
    assert_eq!(&out[30..34], &[10, 0, 2, 11]);
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), 8080);
    assert!(checksums_ok(&out));
    let sport = u16::from_be_bytes([out[34], out[35]]);
    // vm5 answers the VIP; the router turns it back into the VIP's answer.
    let (v, back) = r.run(
        2,
        &l4(GW_B, VM5, "10.0.2.11", VIP, 6, (8080, sport), SYN | ACK),
    );
    assert_eq!(v, Verdict::Unicast { port: 2 });
    assert_eq!(&back[0..6], &VM3);
    assert_eq!(&back[26..30], &[10, 0, 1, 100]);
    assert_eq!(u16::from_be_bytes([back[34], back[35]]), 80);
    assert_eq!(&back[30..34], &[10, 0, 2, 10]);
    assert_eq!(u16::from_be_bytes([back[36], back[37]]), 40000);
    assert!(checksums_ok(&back));
    // A client on another subnet keeps its address (no hairpin).
    let member = r.connect(6, 41000, SYN);
    assert_eq!(member, [10, 0, 2, 11]);
}

#[test]
fn a_refused_datagram_probe_is_counted() {
    use crate::lb4_health::{build_probe, probe_port, PROBE_LEN};
    let mut r = Rig::new(&monitored(
        LbProtocol::Udp,
        crate::lb4::ProbeKind::UdpConnect,
    ));
    let gw: Ipv4Addr = "10.0.2.1".parse().unwrap();
    let vm5: Ipv4Addr = "10.0.2.11".parse().unwrap();
    let mut probe = [0u8; PROBE_LEN];
    let n = build_probe(
        &mut probe,
        crate::lb4::ProbeKind::UdpConnect,
        VM5,
        GW_B,
        gw,
        vm5,
        probe_port(1).unwrap(),
        8080,
        7,
    );
    assert_eq!(n, 42);
    assert!(checksums_ok(&probe[..n]), "an empty UDP datagram");
    // vm5's ICMP port unreachable quoting it, to the router.
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&probe[14..n]);
    let sum = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let frame = crate::packet::build::ipv4(GW_B, VM5, None, vm5, gw, 64, 1, &icmp);
    let (v, _) = r.run(2, &frame);
    assert_eq!(v, Verdict::Consumed);
    let stats = r.t.stateful.lb.stats();
    assert_eq!((stats[1].probes_refused, stats[1].probes_answered), (1, 0));
    // A datagram back from the member's port counts as answered.
    let answer = l4(
        GW_B,
        VM5,
        "10.0.2.11",
        "10.0.2.1",
        17,
        (8080, probe_port(1).unwrap()),
        0,
    );
    let (v, _) = r.run(2, &answer);
    assert_eq!(v, Verdict::Consumed);
    assert_eq!(r.t.stateful.lb.stats()[1].probes_answered, 1);
}
