use std::net::Ipv4Addr;

use crate::config::compile;
use crate::counters::{DropReason, Outcome};
use crate::packet::build::{arp, icmp_echo, ipv4};
use crate::packet::checksum::internet_checksum;
use crate::packet::headers::Mac;
use crate::packet::parse;
use crate::packet::parse::{L3, L4};
use crate::pipeline::{process, Decision, Learned, NoTrace, RecordTrace, Verdict};
use crate::tables::Tables;
use crate::testutil::{interfaces, topology};

const VM1: Mac = [2, 0, 0, 0, 0, 1];
const VM2: Mac = [2, 0, 0, 0, 0, 2];
const VM3: Mac = [2, 0, 0, 0, 0, 3];
const VM4: Mac = [2, 0, 0, 0, 0, 4];
const GW_A: Mac = [2, 0, 0, 0, 0xff, 1];
const GW_B: Mac = [2, 0, 0, 0, 0xff, 2];
const GW_V: Mac = [2, 0, 0, 0, 0xff, 3];
const BCAST: Mac = [0xff; 6];
const P0: u16 = 0;
const UP: u16 = 4;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

struct Rig {
    t: Tables,
    learned: Learned,
}

impl Rig {
    fn new() -> Rig {
        let t = compile(&topology(), &interfaces(), 1).unwrap();
        let mut learned = Learned::new(1024);
        learned.sync(1);
        Rig { t, learned }
    }

    fn run(&mut self, in_port: u16, frame: &[u8]) -> (Decision, Vec<u8>) {
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
        (d, buf)
    }
}

fn ping(dst: Mac, src: Mac, sip: &str, dip: &str, ttl: u8) -> Vec<u8> {
    icmp_echo(dst, src, ip(sip), ip(dip), ttl, b"payload!")
}

#[test]
fn l2_unicast_to_bound_mac() {
    let mut r = Rig::new();
    let (d, out) = r.run(P0, &ping(VM2, VM1, "10.0.1.10", "10.0.1.11", 64));
    assert_eq!(d.verdict, Verdict::Unicast { port: 1 });
    assert_eq!(d.outcome, Some(Outcome::L2Unicast));
    assert_eq!(
        out,
        ping(VM2, VM1, "10.0.1.10", "10.0.1.11", 64),
        "switching must not modify the frame"
    );
}

#[test]
fn broadcast_and_unknown_unicast_flood_except_ingress() {
    let mut r = Rig::new();
    let (d, _) = r.run(P0, &ping(BCAST, VM1, "10.0.1.10", "10.0.1.255", 64));
    assert_eq!(
        d.verdict,
        Verdict::Flood {
            switch: 0,
            except: 0
        }
    );
    let (d, _) = r.run(
        P0,
        &ping([2, 9, 9, 9, 9, 9], VM1, "10.0.1.10", "10.0.1.77", 64),
    );
    assert_eq!(
        d.verdict,
        Verdict::Flood {
            switch: 0,
            except: 0
        }
    );
}

#[test]
fn port_security_drops_spoofed_mac_and_ip() {
    let mut r = Rig::new();
    let (d, _) = r.run(
        P0,
        &ping(VM2, [2, 0, 0, 0, 0, 0x66], "10.0.1.10", "10.0.1.11", 64),
    );
    assert_eq!(d.verdict, Verdict::Drop(DropReason::SpoofedMac));
    let (d, _) = r.run(P0, &ping(VM2, VM1, "10.0.1.66", "10.0.1.11", 64));
    assert_eq!(d.verdict, Verdict::Drop(DropReason::SpoofedIp));
    let (d, _) = r.run(
        P0,
        &arp(
            1,
            BCAST,
            VM1,
            ip("10.0.1.66"),
            [0; 6],
            ip("10.0.1.11"),
            None,
        ),
    );
    assert_eq!(d.verdict, Verdict::Drop(DropReason::SpoofedIp));
    // A frame on an interface/VLAN with no logical port.
    let (d, _) = r.run(3, &ping(VM2, VM4, "10.0.3.10", "10.0.1.11", 64));
    assert_eq!(d.verdict, Verdict::Drop(DropReason::UnknownIngress));
}

#[test]
fn arp_for_binding_and_gateway_is_answered_not_flooded() {
    let mut r = Rig::new();
    for (target, mac) in [("10.0.1.11", VM2), ("10.0.1.1", GW_A)] {
        let (d, out) = r.run(
            P0,
            &arp(1, BCAST, VM1, ip("10.0.1.10"), [0; 6], ip(target), None),
        );
        assert_eq!(d.verdict, Verdict::Reply);
        assert_eq!(d.outcome, Some(Outcome::ArpReplied));
        let want = arp(2, VM1, mac, ip(target), VM1, ip("10.0.1.10"), None);
        assert_eq!(out, want);
    }
    // Unknown target: flooded like any broadcast.
    let (d, _) = r.run(
        P0,
        &arp(
            1,
            BCAST,
            VM1,
            ip("10.0.1.10"),
            [0; 6],
            ip("10.0.1.99"),
            None,
        ),
    );
    assert!(matches!(d.verdict, Verdict::Flood { .. }));
}

#[test]
fn macs_are_learned_on_ports_without_bindings() {
    let mut r = Rig::new();
    let ext: Mac = [2, 0xee, 0, 0, 0, 1];
    let (d, _) = r.run(
        UP,
        &ipv4(
            BCAST,
            ext,
            None,
            ip("10.0.1.200"),
            ip("10.0.1.255"),
            64,
            17,
            &[0; 8],
        ),
    );
    assert!(d.learned);
    assert!(matches!(d.verdict, Verdict::Flood { except: 4, .. }));
    let (d, _) = r.run(P0, &ping(ext, VM1, "10.0.1.10", "10.0.1.200", 64));
    assert_eq!(d.verdict, Verdict::Unicast { port: UP });
    // A new configuration generation forgets learned MACs.
    r.learned.sync(2);
    let (d, _) = r.run(P0, &ping(ext, VM1, "10.0.1.10", "10.0.1.200", 64));
    assert!(matches!(d.verdict, Verdict::Flood { .. }));
    // Hairpin: a learned MAC behind the ingress port is dropped, not reflected.
    r.run(
        UP,
        &ipv4(
            BCAST,
            ext,
            None,
            ip("10.0.1.200"),
            ip("10.0.1.255"),
            64,
            17,
            &[0; 8],
        ),
    );
    let (d, _) = r.run(
        UP,
        &ipv4(
            ext,
            [2, 0xee, 0, 0, 0, 2],
            None,
            ip("10.0.1.201"),
            ip("10.0.1.200"),
            64,
            17,
            &[0; 8],
        ),
    );
    assert_eq!(d.verdict, Verdict::Drop(DropReason::Hairpin));
}

#[test]
fn learning_is_bounded() {
    let mut l = Learned::new(2);
    assert!(l.learn(0, &[2, 0, 0, 0, 0, 1], 1));
    assert!(l.learn(0, &[2, 0, 0, 0, 0, 2], 1));
    assert!(!l.learn(0, &[2, 0, 0, 0, 0, 3], 1));
    assert_eq!(l.len(), 2);
    assert!(l.learn(0, &[2, 0, 0, 0, 0, 1], 2), "a moved MAC is updated");
}

fn assert_ipv4_valid(frame: &[u8]) -> crate::packet::parse::Ipv4Info {
    let p = parse(frame).unwrap();
    let L3::Ipv4(ip) = p.l3 else {
        panic!("not IPv4")
    };
    assert_eq!(
        internet_checksum(&frame[p.l3_offset..p.l3_offset + ip.header_len]),
        0,
        "IPv4 checksum"
    );
    ip
}

#[test]
fn routes_across_subnets_with_ttl_decrement() {
    let mut r = Rig::new();
    let (d, out) = r.run(P0, &ping(GW_A, VM1, "10.0.1.10", "10.0.2.10", 64));
    assert_eq!(d.verdict, Verdict::Unicast { port: 2 });
    assert_eq!(d.outcome, Some(Outcome::Routed));
    assert_eq!(&out[0..6], &VM3);
    assert_eq!(&out[6..12], &GW_B);
    let ip4 = assert_ipv4_valid(&out);
    assert_eq!(
        (ip4.ttl, ip4.src, ip4.dst),
        (63, ip("10.0.1.10"), ip("10.0.2.10"))
    );
    // Static route: 192.0.2.0/24 via vm3.
    let (d, out) = r.run(P0, &ping(GW_A, VM1, "10.0.1.10", "192.0.2.5", 9));
    assert_eq!(d.verdict, Verdict::Unicast { port: 2 });
    assert_eq!(&out[0..6], &VM3);
    assert_eq!(assert_ipv4_valid(&out).ttl, 8);
}

#[test]
fn routing_into_and_out_of_a_vlan_switch_moves_the_tag() {
    let mut r = Rig::new();
    let (d, out) = r.run(P0, &ping(GW_A, VM1, "10.0.1.10", "10.0.3.10", 64));
    assert_eq!(d.verdict, Verdict::Unicast { port: 3 });
    let p = parse(&out).unwrap();
    assert_eq!((p.vlan, p.dst, p.src), (Some(100), VM4, GW_V));
    assert_eq!(assert_ipv4_valid(&out).ttl, 63);
    // And back: tagged in, untagged out.
    let (d, back) = r.run(3, &out_with(VM4, GW_V, &out));
    assert_eq!(
        d.verdict,
        Verdict::Drop(DropReason::SpoofedIp),
        "dst/src not swapped: vm4 may not send as 10.0.1.10"
    );
    let reply = ipv4(
        GW_V,
        VM4,
        Some(100),
        ip("10.0.3.10"),
        ip("10.0.1.10"),
        64,
        17,
        &[0; 8],
    );
    let (d, back2) = r.run(3, &reply);
    assert_eq!(d.verdict, Verdict::Unicast { port: 0 });
    let p = parse(&back2).unwrap();
    assert_eq!((p.vlan, p.dst, p.src, p.l3_offset), (None, VM1, GW_A, 14));
    assert_eq!(back2.len(), reply.len() - 4);
    assert_eq!(assert_ipv4_valid(&back2).ttl, 63);
    drop(back);
}

fn out_with(src: Mac, dst: Mac, frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

#[test]
fn expiring_ttl_and_missing_route_answer_with_icmp() {
    let mut r = Rig::new();
    let orig = ping(GW_A, VM1, "10.0.1.10", "10.0.2.10", 1);
    let (d, out) = r.run(P0, &orig);
    assert_eq!(d.verdict, Verdict::Reply);
    assert_eq!(d.outcome, Some(Outcome::IcmpTimeExceeded));
    assert_eq!((&out[0..6], &out[6..12]), (&VM1[..], &GW_A[..]));
    let ip4 = assert_ipv4_valid(&out);
    assert_eq!(
        (ip4.src, ip4.dst, ip4.proto),
        (ip("10.0.1.1"), ip("10.0.1.10"), 1)
    );
    let p = parse(&out).unwrap();
    assert_eq!(p.l4, L4::Icmp { ty: 11, code: 0 });
    assert_eq!(internet_checksum(&out[34..]), 0, "ICMP checksum");
    // The quote is the original IP header plus 8 bytes.
    assert_eq!(&out[42..], &orig[14..14 + 28]);

    let (d, out) = r.run(P0, &ping(GW_A, VM1, "10.0.1.10", "172.16.0.1", 64));
    assert_eq!(d.outcome, Some(Outcome::IcmpNetUnreachable));
    assert_eq!(parse(&out).unwrap().l4, L4::Icmp { ty: 3, code: 0 });
    assert_eq!(internet_checksum(&out[34..]), 0);

    // Never an ICMP error about an ICMP error.
    let mut err = ipv4(
        GW_A,
        VM1,
        None,
        ip("10.0.1.10"),
        ip("10.0.2.10"),
        1,
        1,
        &[3, 0, 0xfc, 0xff, 0, 0, 0, 0],
    );
    let c = internet_checksum(&err[34..]);
    err[36..38].copy_from_slice(&c.to_be_bytes());
    let (d, _) = r.run(P0, &err);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::IcmpErrorSuppressed));
}

#[test]
fn gateway_answers_ping_and_rejects_bad_checksums() {
    let mut r = Rig::new();
    let (d, out) = r.run(P0, &ping(GW_A, VM1, "10.0.1.10", "10.0.1.1", 64));
    assert_eq!(d.outcome, Some(Outcome::RouterEchoReplied));
    let ip4 = assert_ipv4_valid(&out);
    assert_eq!((ip4.src, ip4.dst), (ip("10.0.1.1"), ip("10.0.1.10")));
    assert_eq!(parse(&out).unwrap().l4, L4::Icmp { ty: 0, code: 0 });
    assert_eq!(internet_checksum(&out[34..]), 0);

    let mut bad = ping(GW_A, VM1, "10.0.1.10", "10.0.2.10", 64);
    bad[24] ^= 0x55;
    let (d, _) = r.run(P0, &bad);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::BadIpv4Checksum));
}

#[test]
fn malformed_frames_are_dropped_with_a_reason() {
    let mut r = Rig::new();
    let (d, _) = r.run(P0, &[0u8; 10]);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::MalformedEthernet));
    let good = ping(GW_A, VM1, "10.0.1.10", "10.0.2.10", 64);
    let (d, _) = r.run(P0, &good[..30]);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::MalformedIpv4));
}

#[test]
fn trace_lists_stages_and_matches_forwarding() {
    let t = compile(&topology(), &interfaces(), 1).unwrap();
    let frame = ping(GW_A, VM1, "10.0.1.10", "10.0.2.10", 64);
    let mut buf = vec![0u8; 2048];
    buf[..frame.len()].copy_from_slice(&frame);
    let mut len = frame.len();
    let mut tr = RecordTrace::default();
    let d = process(&t, &mut Learned::new(0), 0, &mut buf, &mut len, &mut tr);
    assert_eq!(d.verdict, Verdict::Unicast { port: 2 });
    let stages: Vec<&str> = tr.steps.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(
        stages,
        ["parse", "ingress", "port_security", "router", "router"]
    );
    assert!(
        tr.steps[3].decision.contains("next hop 10.0.2.10"),
        "{:?}",
        tr.steps
    );
    assert!(
        tr.steps[4].decision.contains("TTL 64 → 63"),
        "{:?}",
        tr.steps
    );
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// Arbitrary frames, mutated valid frames and every ingress port: the
        /// pipeline never panics and never grows a frame past its buffer.
        #[test]
        fn pipeline_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
            pos in 0usize..100, val in any::<u8>(), port in 0u16..6, cap in 40usize..200,
        ) {
            let t = compile(&topology(), &interfaces(), 1).unwrap();
            let mut learned = Learned::new(16);
            let mut seeds = vec![bytes,
                ping(GW_A, VM1, "10.0.1.10", "10.0.2.10", 1),
                ping(GW_A, VM1, "10.0.1.10", "172.16.0.1", 64),
                arp(1, BCAST, VM1, ip("10.0.1.10"), [0; 6], ip("10.0.1.1"), None)];
            for s in &mut seeds[1..] { if pos < s.len() { s[pos] = val; } }
            for s in seeds {
                let mut buf = vec![0u8; cap.max(s.len())];
                buf[..s.len()].copy_from_slice(&s);
                let mut len = s.len();
                let _ = process(&t, &mut learned, port, &mut buf, &mut len, &mut RecordTrace::default());
                prop_assert!(len <= buf.len());
            }
        }
    }
}

fn ns_frame(src_ip: &str, target: &str, hop: u8) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0xff, 0, 0, 0x11];
    f.extend_from_slice(&VM1);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 32, 58, hop]);
    f.extend_from_slice(&src_ip.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(
        &"ff02::1:ff00:11"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&target.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&[1, 1]);
    f.extend_from_slice(&VM1);
    f
}

#[test]
fn neighbor_solicitation_for_binding_is_answered() {
    let mut r = Rig::new();
    let (d, out) = r.run(P0, &ns_frame("fe80::1", "fd00:1::11", 255));
    assert_eq!(d.verdict, Verdict::Reply);
    assert_eq!(d.outcome, Some(Outcome::NdReplied));
    assert_eq!((&out[0..6], &out[6..12]), (&VM1[..], &VM2[..]));
    let p = parse(&out).unwrap();
    let L3::Ipv6(ip6) = p.l3 else { panic!() };
    assert_eq!(
        (ip6.src, ip6.dst, ip6.hop_limit),
        (
            "fd00:1::11".parse().unwrap(),
            "fe80::1".parse().unwrap(),
            255
        )
    );
    assert_eq!(p.l4, L4::Icmpv6 { ty: 136, code: 0 });
    assert_eq!(&out[54 + 26..54 + 32], &VM2, "target link-layer option");
    // The checksum over pseudo-header + message verifies.
    let mut pseudo = out[22..54].to_vec();
    pseudo.extend_from_slice(&[0, 0, 0, 32, 0, 0, 0, 58]);
    pseudo.extend_from_slice(&out[54..]);
    assert_eq!(internet_checksum(&pseudo), 0);
    // Unbound target, DAD probe, or bad hop limit: not answered (flooded).
    for f in [
        ns_frame("fe80::1", "fd00:1::99", 255),
        ns_frame("::", "fd00:1::11", 255),
        ns_frame("fe80::1", "fd00:1::11", 64),
    ] {
        let (d, _) = r.run(P0, &f);
        assert!(matches!(d.verdict, Verdict::Flood { .. }), "{d:?}");
    }
    // Port security: a global source that is not bound.
    let (d, _) = r.run(P0, &ns_frame("fd00:1::99", "fd00:1::11", 255));
    assert_eq!(d.verdict, Verdict::Drop(DropReason::SpoofedIp));
}

#[test]
fn ecmp_spreads_flows_and_keeps_each_flow_on_one_hop() {
    use crate::model::{PortSpec, StaticRouteSpec};
    let mut state = topology();
    state.ports.push(PortSpec {
        name: "vm5".into(),
        switch: "b".into(),
        interface: "p3".into(),
        mac: Some("02:00:00:00:00:05".into()),
        ips: vec!["10.0.2.11".into()],
        port_security: true,
    });
    state.routers[0].static_routes.push(StaticRouteSpec {
        prefix: "192.0.2.0/24".into(),
        next_hop: "10.0.2.11".into(),
    });
    let t = compile(&state, &interfaces(), 1).unwrap();
    let mut learned = Learned::new(0);
    let mut seen = std::collections::HashMap::new();
    for sport in 0..64u16 {
        for _ in 0..2 {
            let mut udp = [0u8; 8];
            udp[0..2].copy_from_slice(&(1000 + sport).to_be_bytes());
            udp[2..4].copy_from_slice(&53u16.to_be_bytes());
            udp[5] = 8;
            let f = ipv4(
                GW_A,
                VM1,
                None,
                ip("10.0.1.10"),
                ip("192.0.2.9"),
                64,
                17,
                &udp,
            );
            let mut buf = vec![0u8; 2048];
            buf[..f.len()].copy_from_slice(&f);
            let mut len = f.len();
            let d = process(&t, &mut learned, P0, &mut buf, &mut len, &mut NoTrace);
            let Verdict::Unicast { port } = d.verdict else {
                panic!("{d:?}")
            };
            let expect_mac = if port == 2 { VM3 } else { [2, 0, 0, 0, 0, 5] };
            assert_eq!(&buf[0..6], &expect_mac);
            assert_eq!(
                *seen.entry(sport).or_insert(port),
                port,
                "a flow changed next hop"
            );
        }
    }
    let ports: std::collections::HashSet<u16> = seen.values().copied().collect();
    assert_eq!(
        ports,
        [2u16, 3].into_iter().collect(),
        "both next hops used"
    );
}

fn ipv6_udp(dst: Mac, src: Mac, sip: &str, dip: &str, hop: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, hop]);
    f.extend_from_slice(&sip.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&dip.parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&[0x30, 0x39, 0, 53, 0, 8, 0, 0]);
    f
}

#[test]
fn routes_ipv6_across_subnets() {
    let mut r = Rig::new();
    // vm2 (fd00:1::11) → vm3 (fd00:2::10) through the router.
    let f = ipv6_udp(GW_A, VM2, "fd00:1::11", "fd00:2::10", 64);
    let (d, out) = r.run(1, &f);
    assert_eq!(d.verdict, Verdict::Unicast { port: 2 });
    assert_eq!((&out[0..6], &out[6..12]), (&VM3[..], &GW_B[..]));
    let L3::Ipv6(ip6) = parse(&out).unwrap().l3 else {
        panic!()
    };
    assert_eq!(ip6.hop_limit, 63);
    assert_eq!(&out[22..], &f[22..], "addresses and payload untouched");
    let (d, _) = r.run(1, &ipv6_udp(GW_A, VM2, "fd00:1::11", "fd00:2::10", 1));
    assert_eq!(d.verdict, Verdict::Drop(DropReason::HopLimitExceeded));
    let (d, _) = r.run(1, &ipv6_udp(GW_A, VM2, "fd00:1::11", "fd00:9::1", 64));
    assert_eq!(d.verdict, Verdict::Drop(DropReason::NoRoute6));
    // The gateway's IPv6 address is answered by the ND responder.
    let (d, out) = r.run(P0, &ns_frame("fe80::1", "fd00:1::1", 255));
    assert_eq!(d.outcome, Some(Outcome::NdReplied));
    assert_eq!(&out[6..12], &GW_A);
}

/// A next hop behind a learning port (an uplink) has no binding: the
/// router asks for it (once per second), learns it from the reply (taken,
/// not forwarded) and routes to it from then on.
#[test]
fn router_resolves_unbound_next_hops_by_arp() {
    const HOST: Mac = [2, 0, 0, 0, 0x77, 1];
    let mut r = Rig::new();
    let frame = ping(GW_B, VM3, "10.0.2.10", "10.0.1.77", 64);
    let (d, out) = r.run(2, &frame);
    assert_eq!(d.outcome, Some(Outcome::ArpRequested));
    assert!(matches!(d.verdict, Verdict::Flood { .. }), "{d:?}");
    assert_eq!(
        out,
        arp(
            1,
            BCAST,
            GW_A,
            ip("10.0.1.1"),
            [0; 6],
            ip("10.0.1.77"),
            None
        )
    );
    // Within the same second: not asked again.
    let (d, _) = r.run(2, &frame);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::NoNeighbor));
    let reply = arp(2, GW_A, HOST, ip("10.0.1.77"), GW_A, ip("10.0.1.1"), None);
    let (d, _) = r.run(UP, &reply);
    assert_eq!(d.verdict, Verdict::Consumed);
    assert_eq!(d.outcome, Some(Outcome::NeighborLearned));
    assert_eq!(r.learned.neighbor(0, ip("10.0.1.77")), Some(HOST));
    let (d, out) = r.run(2, &frame);
    assert_eq!(d.verdict, Verdict::Unicast { port: UP });
    assert_eq!((&out[0..6], &out[6..12]), (&HOST[..], &GW_A[..]));
    // A bound address is never learned over its binding.
    let spoof = arp(2, GW_A, HOST, ip("10.0.1.11"), GW_A, ip("10.0.1.1"), None);
    r.run(UP, &spoof);
    assert_eq!(r.learned.neighbor(0, ip("10.0.1.11")), None);
    // A new configuration forgets what was learned.
    r.learned.sync(2);
    assert_eq!(r.learned.neighbor(0, ip("10.0.1.77")), None);
}

/// Neighbors age: probed once unconfirmed for the reachable time (still
/// used meanwhile), kept while their ARP confirms them, forgotten when they
/// stay silent, after which the router asks by broadcast again. What one
/// worker learns or confirms reaches the others through its journal.
#[test]
fn neighbors_are_probed_when_stale_and_forgotten_when_silent() {
    use crate::handoff::Learn;
    use crate::pipeline::{NEIGHBOR_EXPIRE_S, NEIGHBOR_REACHABLE_S};
    const HOST: Mac = [2, 0, 0, 0, 0x77, 1];
    let host = ip("10.0.1.77");
    let mut r = Rig::new();
    let reply = arp(2, GW_A, HOST, host, GW_A, ip("10.0.1.1"), None);
    r.learned.stateful.ct.tick(100);
    r.run(UP, &reply);
    assert_eq!(r.learned.neighbor(0, host), Some(HOST));
    // The journal carries it to the other workers.
    let (generation, shared) = r.learned.take_journal();
    let shared: Vec<Learn> = shared.collect();
    assert!(
        shared.contains(&Learn::Neighbor {
            key: (u64::from(u32::from(host))),
            mac: HOST,
            confirmed: 100
        }),
        "{shared:?}"
    );
    let mut other = Learned::new(1024);
    other.sync(generation);
    for learn in shared {
        other.learn_shared(generation, learn);
    }
    assert_eq!(other.neighbor(0, host), Some(HOST));
    assert_eq!(other.take_journal().1.count(), 0, "not shared again");

    r.learned.age_neighbors(100 + NEIGHBOR_REACHABLE_S - 1);
    assert_eq!(r.learned.next_neighbor_probe(), None, "fresh");
    r.learned.age_neighbors(100 + NEIGHBOR_REACHABLE_S);
    assert_eq!(r.learned.next_neighbor_probe(), Some((0, host)));
    assert_eq!(r.learned.next_neighbor_probe(), None);
    let frame = ping(GW_B, VM3, "10.0.2.10", "10.0.1.77", 64);
    let (d, _) = r.run(2, &frame);
    assert_eq!(
        d.verdict,
        Verdict::Unicast { port: UP },
        "stale is still used"
    );
    // Its answer confirms it: fresh again.
    r.learned.stateful.ct.tick(100 + NEIGHBOR_REACHABLE_S + 1);
    r.run(UP, &reply);
    r.learned.age_neighbors(100 + 2 * NEIGHBOR_REACHABLE_S);
    assert_eq!(r.learned.next_neighbor_probe(), None);
    // Silent past the expiry: forgotten, and the next packet asks again.
    let version = r.learned.version();
    r.learned
        .age_neighbors(100 + NEIGHBOR_REACHABLE_S + 1 + NEIGHBOR_EXPIRE_S);
    assert_eq!(r.learned.neighbor(0, host), None);
    assert!(r.learned.version() > version, "cached flows to it go");
    r.learned.stateful.ct.tick(500);
    let (d, _) = r.run(2, &frame);
    assert_eq!(d.outcome, Some(Outcome::ArpRequested));
}
