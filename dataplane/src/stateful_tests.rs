//! Security groups, conntrack and NAT through the whole pipeline.

use std::net::Ipv4Addr;

use crate::config::compile;
use crate::conntrack::tcp::{ACK, FIN, SYN};
use crate::counters::DropReason;
use crate::model::{
    DesiredState, NatKind, NatRuleSpec, PortSpec, RouterPortSpec, RuleAction, RuleDirection,
    SecurityGroupSpec, SecurityRuleSpec, SwitchSpec,
};
use crate::packet::build::ipv4;
use crate::packet::checksum::internet_checksum;
use crate::packet::headers::Mac;
use crate::pipeline::{process, Learned, NoTrace, RecordTrace, Verdict};
use crate::tables::Tables;
use crate::testutil::{interfaces, topology};

const VM1: Mac = [2, 0, 0, 0, 0, 1];
const VM2: Mac = [2, 0, 0, 0, 0, 2];
const GW_A: Mac = [2, 0, 0, 0, 0xff, 1];
const GW_B: Mac = [2, 0, 0, 0, 0xff, 2];
const VM3: Mac = [2, 0, 0, 0, 0, 3];
const VM1_IP: &str = "10.0.1.10";
const VM2_IP: &str = "10.0.1.11";
const VM3_IP: &str = "10.0.2.10";

#[allow(clippy::too_many_arguments)]
fn tcp(
    dst: Mac,
    src: Mac,
    sip: &str,
    dip: &str,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 0x50;
    h[13] = flags;
    h[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let sip: Ipv4Addr = sip.parse().unwrap();
    let dip: Ipv4Addr = dip.parse().unwrap();
    ipv4(dst, src, None, sip, dip, 64, 6, &h)
}

fn rule(dir: RuleDirection, proto: &str, port: Option<u16>) -> SecurityRuleSpec {
    SecurityRuleSpec {
        direction: dir,
        ethertype: Default::default(),
        protocol: Some(proto.into()),
        port_min: port,
        port_max: port,
        icmp_type: None,
        icmp_code: None,
        remote_cidr: None,
        remote_group: None,
        remote_address_group: None,
        port_set: None,
        priority: 0,
        action: RuleAction::Allow,
    }
}

/// vm2 in "web" (ingress TCP 80 and 443), vm3 in "db" (ingress TCP 5432 from "web").
fn state(web_ports: &[u16]) -> DesiredState {
    let mut s = topology();
    s.security_groups = vec![
        SecurityGroupSpec {
            name: "web".into(),
            ports: vec!["vm2".into()],
            rules: web_ports
                .iter()
                .map(|p| rule(RuleDirection::Ingress, "tcp", Some(*p)))
                .collect(),
        },
        SecurityGroupSpec {
            name: "db".into(),
            ports: vec!["vm3".into()],
            rules: vec![SecurityRuleSpec {
                remote_group: Some("web".into()),
                ..rule(RuleDirection::Ingress, "tcp", Some(5432))
            }],
        },
    ];
    s
}

struct Rig {
    t: Tables,
    learned: Learned,
}

impl Rig {
    fn new(s: &DesiredState) -> Rig {
        let t = compile(s, &interfaces(), 1).unwrap();
        let mut learned = Learned::new(64);
        learned.sync(1);
        Rig { t, learned }
    }

    fn apply(&mut self, s: &DesiredState) {
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

    fn verdict(&mut self, in_port: u16, frame: &[u8]) -> Verdict {
        self.run(in_port, frame).0
    }
}

const DENIED: Verdict = Verdict::Drop(DropReason::SecurityGroupDenied);

/// A full handshake vm1:sport → vm2:dport; returns the verdicts of the three packets.
fn handshake(r: &mut Rig, sport: u16, dport: u16) -> [Verdict; 3] {
    [
        r.verdict(0, &tcp(VM2, VM1, VM1_IP, VM2_IP, sport, dport, SYN, 100, 0)),
        r.verdict(
            1,
            &tcp(VM1, VM2, VM2_IP, VM1_IP, dport, sport, SYN | ACK, 500, 101),
        ),
        r.verdict(
            0,
            &tcp(VM2, VM1, VM1_IP, VM2_IP, sport, dport, ACK, 101, 501),
        ),
    ]
}

#[test]
fn allowed_port_connects_denied_port_does_not() {
    let mut r = Rig::new(&state(&[80]));
    let to_vm2 = Verdict::Unicast { port: 1 };
    let to_vm1 = Verdict::Unicast { port: 0 };
    assert_eq!(handshake(&mut r, 40000, 80), [to_vm2, to_vm1, to_vm2]);
    assert_eq!(
        r.verdict(0, &tcp(VM2, VM1, VM1_IP, VM2_IP, 40001, 22, SYN, 1, 0)),
        DENIED
    );
    // Not a connection start: invalid, not a hole.
    assert_eq!(
        r.verdict(
            0,
            &tcp(VM2, VM1, VM1_IP, VM2_IP, 40002, 22, SYN | ACK, 1, 1)
        ),
        Verdict::Drop(DropReason::CtInvalid)
    );
    // Egress is allowed by default and its replies come back in.
    assert_eq!(
        r.verdict(1, &tcp(VM1, VM2, VM2_IP, VM1_IP, 33000, 9999, SYN, 7, 0)),
        to_vm1
    );
    assert_eq!(
        r.verdict(
            0,
            &tcp(VM2, VM1, VM1_IP, VM2_IP, 9999, 33000, SYN | ACK, 70, 8)
        ),
        to_vm2
    );
    // Per-rule hit counter: the one SYN to port 80.
    let hits: Vec<u64> =
        r.t.stateful
            .counters
            .hits
            .iter()
            .map(|h| h.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
    assert_eq!(hits[0], 1, "{hits:?}");
}

#[test]
fn rule_change_cuts_denied_connections_and_keeps_allowed_ones() {
    let mut r = Rig::new(&state(&[80, 443]));
    let to_vm2 = Verdict::Unicast { port: 1 };
    assert_eq!(handshake(&mut r, 40000, 80)[2], to_vm2);
    assert_eq!(handshake(&mut r, 40001, 443)[2], to_vm2);
    // An unrelated change: both survive.
    let mut s = state(&[80, 443]);
    s.switches[2].name = "v".into();
    r.apply(&s);
    let data = |sport, dport| tcp(VM2, VM1, VM1_IP, VM2_IP, sport, dport, ACK, 101, 501);
    assert_eq!(r.verdict(0, &data(40000, 80)), to_vm2);
    // Port 80 removed: its connection dies on the next packet, both ways.
    r.apply(&state(&[443]));
    assert_eq!(r.verdict(0, &data(40000, 80)), DENIED);
    assert_eq!(
        r.verdict(1, &tcp(VM1, VM2, VM2_IP, VM1_IP, 80, 40000, ACK, 501, 101)),
        DENIED
    );
    assert_eq!(r.verdict(0, &data(40001, 443)), to_vm2);
    // Closing and reconnecting to 80 stays denied; 443 closes normally.
    assert_eq!(
        r.verdict(0, &tcp(VM2, VM1, VM1_IP, VM2_IP, 40000, 80, SYN, 9000, 0)),
        DENIED
    );
    assert_eq!(
        r.verdict(
            0,
            &tcp(VM2, VM1, VM1_IP, VM2_IP, 40001, 443, FIN | ACK, 101, 501)
        ),
        to_vm2
    );
}

#[test]
fn remote_group_rule_follows_membership_across_the_router() {
    let mut r = Rig::new(&state(&[80]));
    let to_vm3 = Verdict::Unicast { port: 2 };
    // vm2 is in "web": allowed to the database port; vm1 is not.
    assert_eq!(
        r.verdict(1, &tcp(GW_A, VM2, VM2_IP, VM3_IP, 41000, 5432, SYN, 1, 0)),
        to_vm3
    );
    assert_eq!(
        r.verdict(0, &tcp(GW_A, VM1, VM1_IP, VM3_IP, 41001, 5432, SYN, 1, 0)),
        DENIED
    );
    // The reply is routed back (vm3's egress is allowed, vm2's ingress tracked).
    assert_eq!(
        r.verdict(
            2,
            &tcp(GW_B, VM3, VM3_IP, VM2_IP, 5432, 41000, SYN | ACK, 9, 2)
        ),
        Verdict::Unicast { port: 1 }
    );
    // vm1 joins "web": now allowed.
    let mut s = state(&[80]);
    s.security_groups[0].ports.push("vm1".into());
    r.apply(&s);
    assert_eq!(
        r.verdict(0, &tcp(GW_A, VM1, VM1_IP, VM3_IP, 41002, 5432, SYN, 1, 0)),
        to_vm3
    );
}

#[test]
fn full_table_drops_new_connections_only() {
    let s = state(&[80]);
    let mut r = Rig {
        t: compile(&s, &interfaces(), 1).unwrap(),
        learned: Learned::new(64).with_connections(2),
    };
    r.learned.sync(1);
    let to_vm2 = Verdict::Unicast { port: 1 };
    assert_eq!(handshake(&mut r, 1, 80)[2], to_vm2);
    assert_eq!(handshake(&mut r, 2, 80)[2], to_vm2);
    let full = Verdict::Drop(DropReason::CtTableFull);
    // The SYN and the loose pick-up of the ACK are refused; the SYN-ACK starts nothing.
    assert_eq!(
        handshake(&mut r, 3, 80),
        [full, Verdict::Drop(DropReason::CtInvalid), full]
    );
    assert_eq!(r.learned.stateful.ct.counters.table_full, 2);
    // Established ones keep working.
    assert_eq!(
        r.verdict(0, &tcp(VM2, VM1, VM1_IP, VM2_IP, 1, 80, ACK, 101, 501)),
        to_vm2
    );
}

#[test]
fn trace_names_the_security_group_stage_and_rule() {
    let t = compile(&state(&[80]), &interfaces(), 1).unwrap();
    let mut tr = RecordTrace::default();
    let f = tcp(VM2, VM1, VM1_IP, VM2_IP, 5, 22, SYN, 1, 0);
    let mut buf = vec![0u8; 2048];
    buf[..f.len()].copy_from_slice(&f);
    let mut len = f.len();
    let d = process(&t, &mut Learned::new(0), 0, &mut buf, &mut len, &mut tr);
    assert_eq!(d.verdict, DENIED);
    let step = tr
        .steps
        .iter()
        .find(|s| s.stage == "security_group_in")
        .unwrap();
    assert!(step.decision.contains("default (deny ingress)"), "{step:?}");
}

#[test]
fn bad_security_config_is_rejected() {
    let mut s = state(&[80]);
    s.security_groups[0].rules[0].port_min = Some(90);
    let e = compile(&s, &interfaces(), 1).unwrap_err().to_string();
    assert!(e.contains("port range 90..=80 is empty"), "{e}");
    let mut s = state(&[80]);
    s.security_groups[0].ports.push("nope".into());
    let e = compile(&s, &interfaces(), 1).unwrap_err().to_string();
    assert!(e.contains("unknown port"), "{e}");
    let mut s = state(&[80]);
    let mut deny = s.security_groups[0].rules[0].clone();
    deny.action = RuleAction::Deny;
    s.security_groups[0].rules.push(deny);
    let e = compile(&s, &interfaces(), 1).unwrap_err().to_string();
    assert!(e.contains("opposite actions"), "{e}");
    // Existing JSON without the new fields still parses.
    let old = r#"{"switches":[],"ports":[],"routers":[]}"#;
    assert_eq!(
        serde_json::from_str::<DesiredState>(old).unwrap(),
        DesiredState::default()
    );
}

// --- NAT ---------------------------------------------------------------

const EXT_HOST: Mac = [2, 0, 0, 0, 0, 0x99];
const GW_EXT: Mac = [2, 0, 0, 0, 0xff, 9];
const EXT_HOST_IP: &str = "198.18.0.100";

/// The test topology plus an external switch "ext" (198.18.0.0/24) on the
/// uplink interface with the router at .1 and an internet host at .100.
fn nat_state() -> DesiredState {
    let mut s = topology();
    s.ports.retain(|p| p.name != "uplink");
    s.switches.push(SwitchSpec {
        name: "ext".into(),
        subnet: "198.18.0.0/24".into(),
        vlan: None,
        subnet6: None,
        dhcp: None,
    });
    s.ports.push(PortSpec {
        name: "internet".into(),
        switch: "ext".into(),
        interface: "up".into(),
        mac: Some("02:00:00:00:00:99".into()),
        ips: vec![EXT_HOST_IP.into()],
        port_security: false,
    });
    s.routers[0].ports.push(RouterPortSpec {
        switch: "ext".into(),
        mac: "02:00:00:00:ff:09".into(),
        ip: "198.18.0.1".into(),
        ip6: None,
    });
    let nat = |kind, ext: &str, logical: &str| NatRuleSpec {
        router: "r".into(),
        kind,
        external_ip: ext.into(),
        logical_ip: logical.into(),
        protocol: None,
        external_port: None,
        logical_port: None,
        port_min: Some(20000),
        port_max: Some(20009),
    };
    s.nat = vec![
        nat(NatKind::Snat, "198.18.0.1", "10.0.1.0/24"),
        nat(NatKind::DnatAndSnat, "198.18.0.50", VM3_IP),
        NatRuleSpec {
            protocol: Some("tcp".into()),
            external_port: Some(8080),
            logical_port: Some(80),
            ..nat(NatKind::Dnat, "198.18.0.1", VM2_IP)
        },
    ];
    s
}

fn l4_ok(f: &[u8]) -> bool {
    // TCP checksum over the pseudo-header.
    use crate::packet::checksum::{accumulate, finish};
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let seg = &f[34..14 + total];
    let mut sum = accumulate(0, &f[26..34]);
    sum = accumulate(sum, &[0, 6]);
    sum = accumulate(sum, &u16::try_from(seg.len()).unwrap().to_be_bytes());
    sum = accumulate(sum, seg);
    finish(sum) == 0 && internet_checksum(&f[14..34]) == 0
}

fn with_tcp_checksum(mut f: Vec<u8>) -> Vec<u8> {
    use crate::packet::checksum::{accumulate, finish};
    let seg_len = f.len() - 34;
    let mut sum = accumulate(0, &f[26..34]);
    sum = accumulate(sum, &[0, 6]);
    sum = accumulate(sum, &u16::try_from(seg_len).unwrap().to_be_bytes());
    sum = accumulate(sum, &f[34..]);
    let c = finish(sum);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn snat_translates_both_ways_with_valid_checksums() {
    let mut r = Rig::new(&nat_state());
    let up = 4;
    let syn = with_tcp_checksum(tcp(GW_A, VM1, VM1_IP, EXT_HOST_IP, 40000, 443, SYN, 1, 0));
    let (v, out) = r.run(0, &syn);
    assert_eq!(v, Verdict::Unicast { port: up });
    assert_eq!(&out[26..30], &[198, 18, 0, 1], "source is the external IP");
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert!((20000..=20009).contains(&port), "{port}");
    assert!(l4_ok(&out));
    let reply = with_tcp_checksum(tcp(
        GW_EXT,
        EXT_HOST,
        EXT_HOST_IP,
        "198.18.0.1",
        443,
        port,
        SYN | ACK,
        9,
        2,
    ));
    let (v, back) = r.run(up, &reply);
    assert_eq!(v, Verdict::Unicast { port: 0 });
    assert_eq!(&back[30..34], &[10, 0, 1, 10]);
    assert_eq!(u16::from_be_bytes([back[36], back[37]]), 40000);
    assert!(l4_ok(&back));
    // An unsolicited packet to the SNAT address is not forwarded inside.
    let stray = with_tcp_checksum(tcp(
        GW_EXT,
        EXT_HOST,
        EXT_HOST_IP,
        "198.18.0.1",
        443,
        port + 1,
        SYN,
        9,
        0,
    ));
    assert!(matches!(r.verdict(up, &stray), Verdict::Drop(_)));
}

#[test]
fn snat_ports_exhaust_and_are_counted() {
    let mut r = Rig::new(&nat_state());
    // Ten ports in the range; the same destination for all: the eleventh fails.
    let mut exhausted = 0;
    for i in 0..11u16 {
        let syn = tcp(GW_A, VM1, VM1_IP, EXT_HOST_IP, 30000 + i, 443, SYN, 1, 0);
        if r.verdict(0, &syn) == Verdict::Drop(DropReason::NatPortsExhausted) {
            exhausted += 1;
        }
    }
    assert_eq!(exhausted, 1);
}

#[test]
fn floating_ip_and_port_forwarding_reach_the_vms() {
    let mut r = Rig::new(&nat_state());
    let up = 4;
    // Floating IP: 198.18.0.50 → vm3, and vm3's reply leaves as 198.18.0.50.
    let syn = with_tcp_checksum(tcp(
        GW_EXT,
        EXT_HOST,
        EXT_HOST_IP,
        "198.18.0.50",
        5555,
        22,
        SYN,
        1,
        0,
    ));
    let (v, out) = r.run(up, &syn);
    assert_eq!(v, Verdict::Unicast { port: 2 });
    assert_eq!(&out[30..34], &[10, 0, 2, 10]);
    assert_eq!(
        &out[26..30],
        &[198, 18, 0, 100],
        "the VM sees the real client"
    );
    assert!(l4_ok(&out));
    let reply = with_tcp_checksum(tcp(
        GW_B,
        VM3,
        VM3_IP,
        EXT_HOST_IP,
        22,
        5555,
        SYN | ACK,
        7,
        2,
    ));
    let (v, back) = r.run(2, &reply);
    assert_eq!(v, Verdict::Unicast { port: up });
    assert_eq!(&back[26..30], &[198, 18, 0, 50]);
    assert!(l4_ok(&back));
    // vm3 starting a connection leaves as its floating IP, port kept.
    let (_, out) = r.run(
        2,
        &with_tcp_checksum(tcp(GW_B, VM3, VM3_IP, EXT_HOST_IP, 6000, 80, SYN, 1, 0)),
    );
    assert_eq!(
        (&out[26..30], u16::from_be_bytes([out[34], out[35]])),
        (&[198u8, 18, 0, 50][..], 6000)
    );
    // Port forwarding: 198.18.0.1:8080 → vm2:80.
    let (v, out) = r.run(
        up,
        &with_tcp_checksum(tcp(
            GW_EXT,
            EXT_HOST,
            EXT_HOST_IP,
            "198.18.0.1",
            7000,
            8080,
            SYN,
            1,
            0,
        )),
    );
    assert_eq!(v, Verdict::Unicast { port: 1 });
    assert_eq!(
        (&out[30..34], u16::from_be_bytes([out[36], out[37]])),
        (&[10u8, 0, 1, 11][..], 80)
    );
    assert!(l4_ok(&out));
}

// --- router firewall -----------------------------------------------------

#[test]
fn router_firewall_drops_matching_routed_traffic_and_lets_replies_back() {
    use crate::model::FirewallRuleSpec;
    let mut s = topology();
    let fw =
        |priority, protocol: &str, src: Option<&str>, port: Option<u16>, action| FirewallRuleSpec {
            router: "r".into(),
            priority,
            protocol: Some(protocol.into()),
            src_cidr: src.map(Into::into),
            dst_cidr: None,
            port_min: port,
            port_max: port,
            action,
        };
    s.firewall = vec![
        // Nothing may start from subnet b; nobody reaches port 22 on b.
        fw(10, "any", Some("10.0.2.0/24"), None, RuleAction::Deny),
        fw(20, "tcp", None, Some(22), RuleAction::Deny),
    ];
    let mut r = Rig::new(&s);
    let to_vm3 = Verdict::Unicast { port: 2 };
    assert_eq!(
        r.verdict(0, &tcp(GW_A, VM1, VM1_IP, VM3_IP, 40000, 80, SYN, 1, 0)),
        to_vm3
    );
    // vm3's reply passes although rule 0 denies its source: it is tracked.
    assert_eq!(
        r.verdict(
            2,
            &tcp(GW_B, VM3, VM3_IP, VM1_IP, 80, 40000, SYN | ACK, 9, 2)
        ),
        Verdict::Unicast { port: 0 }
    );
    let fw_denied = Verdict::Drop(DropReason::FirewallDenied);
    assert_eq!(
        r.verdict(0, &tcp(GW_A, VM1, VM1_IP, VM3_IP, 40001, 22, SYN, 1, 0)),
        fw_denied
    );
    assert_eq!(
        r.verdict(2, &tcp(GW_B, VM3, VM3_IP, VM1_IP, 5000, 80, SYN, 1, 0)),
        fw_denied
    );
    // Switched traffic does not cross the router: not filtered.
    assert_eq!(
        r.verdict(0, &tcp(VM2, VM1, VM1_IP, VM2_IP, 40002, 22, SYN, 1, 0)),
        Verdict::Unicast { port: 1 }
    );
    let names = &r.t.stateful.counters.names;
    assert_eq!((names[0].kind.as_str(), names[1].index), ("firewall", 1));
    let hits: Vec<u64> =
        r.t.stateful
            .counters
            .hits
            .iter()
            .map(|h| h.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
    assert_eq!(hits, [1, 1]);
    // A bad rule is rejected precisely.
    s.firewall[1].port_min = Some(30);
    s.firewall[1].port_max = Some(20);
    let e = compile(&s, &interfaces(), 1).unwrap_err().to_string();
    assert!(e.contains("port range 30..=20 is empty"), "{e}");
}

// --- ICMP errors and IPv6 ---------------------------------------------------

fn icmp6(dst: Mac, src: Mac, sip: &str, dip: &str, ty: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 24, 58, 255]);
    f.extend_from_slice(&sip.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&dip.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&[ty, 0, 0, 0, 0, 1, 0, 1]);
    f.extend_from_slice(&[0u8; 16]);
    f
}

#[test]
fn icmp_errors_pass_only_for_tracked_connections() {
    let mut r = Rig::new(&state(&[80]));
    let vm2_ip: Ipv4Addr = VM2_IP.parse().unwrap();
    let vm1_ip: Ipv4Addr = VM1_IP.parse().unwrap();
    let udp = |sport: u16| {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&9u16.to_be_bytes());
        u[5] = 8;
        ipv4(VM1, VM2, None, vm2_ip, vm1_ip, 64, 17, &u)
    };
    // vm2 (in a group) sends UDP out: tracked.
    assert_eq!(r.verdict(1, &udp(5353)), Verdict::Unicast { port: 0 });
    let unreachable = |quoted: &[u8]| {
        let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted[14..42]);
        let c = internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        ipv4(VM2, VM1, None, vm1_ip, vm2_ip, 64, 1, &icmp)
    };
    // vm1's port unreachable about it is related: it reaches vm2.
    assert_eq!(
        r.verdict(0, &unreachable(&udp(5353))),
        Verdict::Unicast { port: 1 }
    );
    // An error about a flow vm2 never sent is new ICMP ingress: denied.
    assert_eq!(r.verdict(0, &unreachable(&udp(6000))), DENIED);
}

#[test]
fn ipv6_echo_is_filtered_but_neighbor_discovery_passes() {
    let mut r = Rig::new(&state(&[80]));
    assert_eq!(
        r.verdict(0, &icmp6(VM2, VM1, "fe80::1", "fd00:1::11", 128)),
        DENIED
    );
    assert_eq!(
        r.verdict(0, &icmp6(VM2, VM1, "fe80::1", "fd00:1::11", 136)),
        Verdict::Unicast { port: 1 }
    );
    // An IPv6 rule lets echo in.
    let mut s = state(&[80]);
    s.security_groups[0].rules.push(SecurityRuleSpec {
        ethertype: crate::model::EtherType::Ipv6,
        icmp_type: Some(128),
        ..rule(RuleDirection::Ingress, "icmpv6", None)
    });
    r.apply(&s);
    assert_eq!(
        r.verdict(0, &icmp6(VM2, VM1, "fe80::1", "fd00:1::11", 128)),
        Verdict::Unicast { port: 1 }
    );
}

/// Found by dataplane/tests/nft_compare.rs: ICMP connection keys carry no
/// type, so an allowed echo request (or timestamp) let any other ICMP type
/// between the same hosts pass as "the same connection", whatever the
/// type/code rules said. Now only the opener's type and its answer do.
#[test]
fn icmp_types_do_not_ride_on_another_types_connection() {
    let mut s = state(&[80]);
    for ty in [8, 13] {
        s.security_groups[0].rules.push(SecurityRuleSpec {
            icmp_type: Some(ty),
            ..rule(RuleDirection::Ingress, "icmp", None)
        });
    }
    let mut r = Rig::new(&s);
    let vm1_ip: Ipv4Addr = VM1_IP.parse().unwrap();
    let vm2_ip: Ipv4Addr = VM2_IP.parse().unwrap();
    let icmp = |dst, src, sip, dip, ty: u8| {
        let mut m = vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1];
        let c = internet_checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        ipv4(dst, src, None, sip, dip, 64, 1, &m)
    };
    let to_vm2 = |ty| icmp(VM2, VM1, vm1_ip, vm2_ip, ty);
    // The echo request is allowed and tracked; more requests pass.
    assert_eq!(r.verdict(0, &to_vm2(8)), Verdict::Unicast { port: 1 });
    assert_eq!(r.verdict(0, &to_vm2(8)), Verdict::Unicast { port: 1 });
    // Its reply comes back out of vm2.
    assert_eq!(
        r.verdict(1, &icmp(VM1, VM2, vm2_ip, vm1_ip, 0)),
        Verdict::Unicast { port: 0 }
    );
    // An echo reply *to* vm2 on the same identifier is no part of it (no
    // rule lets replies in).
    assert_eq!(r.verdict(0, &to_vm2(0)), DENIED);
    // Timestamps are allowed: one is tracked (key without identifier), its
    // answer comes back; an address mask request on that key is denied.
    assert_eq!(r.verdict(0, &to_vm2(13)), Verdict::Unicast { port: 1 });
    assert_eq!(
        r.verdict(1, &icmp(VM1, VM2, vm2_ip, vm1_ip, 14)),
        Verdict::Unicast { port: 0 }
    );
    assert_eq!(r.verdict(0, &to_vm2(17)), DENIED);
    // Allowed on its own merits, a misfit passes without being tracked.
    let mut s2 = s.clone();
    s2.security_groups[0].rules.push(SecurityRuleSpec {
        icmp_type: Some(0),
        ..rule(RuleDirection::Ingress, "icmp", None)
    });
    r.apply(&s2);
    assert_eq!(r.verdict(0, &to_vm2(0)), Verdict::Unicast { port: 1 });
    assert_eq!(r.verdict(0, &to_vm2(8)), Verdict::Unicast { port: 1 });
}

/// Several workers: every NATed reply steers to the worker that created
/// the session (SNAT picks such ports), DNAT/floating-IP traffic steers
/// like the inside's replies, and un-NATed flows are symmetric.
#[test]
fn nat_replies_steer_to_the_worker_that_created_the_session() {
    use crate::steer::{frame_worker, Shard};
    let up = 4;
    let mut per_worker = [0usize; 2];
    for (index, done) in per_worker.iter_mut().enumerate() {
        let mut r = Rig::new(&nat_state());
        r.learned.stateful.shard = Shard { index, count: 2 };
        for sport in 40000..40040u16 {
            let syn = with_tcp_checksum(tcp(GW_A, VM1, VM1_IP, EXT_HOST_IP, sport, 443, SYN, 1, 0));
            // Only the frames steered here reach this worker.
            if frame_worker(&r.t, &syn, 2) != index {
                continue;
            }
            let (v, out) = r.run(0, &syn);
            if v == Verdict::Drop(DropReason::NatPortsExhausted) {
                break; // this worker's share of the 10 ports is used up
            }
            assert_eq!(v, Verdict::Unicast { port: up });
            let port = u16::from_be_bytes([out[34], out[35]]);
            let reply = with_tcp_checksum(tcp(
                GW_EXT,
                EXT_HOST,
                EXT_HOST_IP,
                "198.18.0.1",
                443,
                port,
                SYN | ACK,
                9,
                2,
            ));
            assert_eq!(
                frame_worker(&r.t, &reply, 2),
                index,
                "SNAT reply to port {port}"
            );
            let (v, back) = r.run(up, &reply);
            assert_eq!(v, Verdict::Unicast { port: 0 });
            assert_eq!(u16::from_be_bytes([back[36], back[37]]), sport);
            *done += 1;
        }
    }
    assert!(per_worker.iter().all(|n| *n >= 3), "{per_worker:?}");

    let r = Rig::new(&nat_state());
    for sport in 5000..5064u16 {
        // Port forwarding 198.18.0.1:8080 → vm2:80, and vm2's reply.
        let c = tcp(
            GW_EXT,
            EXT_HOST,
            EXT_HOST_IP,
            "198.18.0.1",
            sport,
            8080,
            SYN,
            1,
            0,
        );
        let s = tcp(GW_A, VM2, VM2_IP, EXT_HOST_IP, 80, sport, SYN | ACK, 1, 2);
        assert_eq!(frame_worker(&r.t, &c, 2), frame_worker(&r.t, &s, 2));
        // Floating IP 198.18.0.50 ↔ vm3.
        let c = tcp(
            GW_EXT,
            EXT_HOST,
            EXT_HOST_IP,
            "198.18.0.50",
            sport,
            22,
            SYN,
            1,
            0,
        );
        let s = tcp(GW_B, VM3, VM3_IP, EXT_HOST_IP, 22, sport, SYN | ACK, 1, 2);
        assert_eq!(frame_worker(&r.t, &c, 2), frame_worker(&r.t, &s, 2));
        // Plain routed traffic, both directions.
        let a = tcp(GW_A, VM1, VM1_IP, VM3_IP, sport, 443, SYN, 1, 0);
        let b = tcp(GW_B, VM3, VM3_IP, VM1_IP, 443, sport, SYN | ACK, 1, 2);
        assert_eq!(frame_worker(&r.t, &a, 2), frame_worker(&r.t, &b, 2));
    }
    // ARP request and reply meet.
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let req = crate::packet::build::arp(1, [0xff; 6], VM1, ip(VM1_IP), [0; 6], ip(VM2_IP), None);
    let rep = crate::packet::build::arp(2, VM1, VM2, ip(VM2_IP), VM1, ip(VM1_IP), None);
    assert_eq!(frame_worker(&r.t, &req, 2), frame_worker(&r.t, &rep, 2));
}
