//! The overlay through [`crate::pipeline::process`] and [`crate::config::compile`].
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use proptest::prelude::*;

use crate::config::{compile, ConfigError, ConfigHandle};
use crate::counters::{DropReason, Outcome};
use crate::overlay::{Encapsulation, OverlayError, OverlayTables};
use crate::packet::build::{icmp_echo, udp64};
use crate::pipeline::{process, Learned, NoTrace, RecordTrace, Verdict};
use crate::tables::Tables;
use crate::testutil::{overlay_interfaces, overlay_topology};

const VM1: [u8; 6] = [2, 0, 0, 0, 0, 1];
const RVM_A: [u8; 6] = [2, 0, 0, 0, 0, 0x50];
const GW_A: [u8; 6] = [2, 0, 0, 0, 0xff, 1];
const P0: u16 = 0;
const UL: u16 = 5;

fn tables() -> Tables {
    compile(
        &overlay_topology(Encapsulation::Geneve),
        &overlay_interfaces(),
        1,
    )
    .unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn run(t: &Tables, in_port: u16, frame: &[u8]) -> (crate::pipeline::Decision, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..frame.len()].copy_from_slice(frame);
    let mut len = frame.len();
    let d = process(
        t,
        &mut Learned::new(64),
        in_port,
        &mut buf,
        &mut len,
        &mut NoTrace,
    );
    (d, buf[..len].to_vec())
}

/// `inner` as the remote host (198.18.0.2) encapsulates it towards us.
fn from_remote(t: &Tables, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut o: OverlayTables = t.overlay.clone().unwrap();
    o.local_ip = ip("198.18.0.2");
    o.endpoints[0].ip = ip("198.18.0.1");
    let mut f = o.header(0, vni, 7, inner.len()).unwrap().to_vec();
    f.extend_from_slice(inner);
    f
}

#[test]
fn switched_to_a_remote_port_is_encapsulated_with_its_vni() {
    let t = tables();
    let f = udp64(RVM_A, VM1, ip("10.0.1.10"), ip("10.0.1.50"));
    let (d, out) = run(&t, P0, &f);
    assert!(
        matches!(
            d.verdict,
            Verdict::Tunnel {
                endpoint: 0,
                vni: 100,
                ..
            }
        ),
        "{d:?}"
    );
    assert_eq!(out, f, "switching leaves the inner frame alone");
    // The same flow always gets the same entropy (UDP source port).
    assert_eq!(run(&t, P0, &f).0, d);
}

#[test]
fn routed_to_a_remote_port_is_encapsulated_with_the_destination_vni() {
    let t = tables();
    let f = icmp_echo(GW_A, VM1, ip("10.0.1.10"), ip("10.0.2.50"), 64, &[0; 32]);
    let (d, out) = run(&t, P0, &f);
    assert!(
        matches!(
            d.verdict,
            Verdict::Tunnel {
                endpoint: 0,
                vni: 200,
                ..
            }
        ),
        "{d:?}"
    );
    assert_eq!(d.outcome, Some(Outcome::Routed));
    assert_eq!(out[14 + 8], 63, "TTL decremented on the sending host");
    assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 0x51]);
}

#[test]
fn decapsulated_frames_reach_local_ports_only() {
    let t = tables();
    let inner = udp64(VM1, RVM_A, ip("10.0.1.50"), ip("10.0.1.10"));
    let (d, out) = run(&t, UL, &from_remote(&t, 100, &inner));
    assert_eq!(d.verdict, Verdict::Unicast { port: P0 }, "{d:?}");
    assert_eq!(out, inner);
    // Towards a remote port: never back into the tunnel.
    let inner = udp64(RVM_A, RVM_A, ip("10.0.1.50"), ip("10.0.1.50"));
    let (d, _) = run(&t, UL, &from_remote(&t, 100, &inner));
    assert_eq!(d.verdict, Verdict::Drop(DropReason::OverlayLoop));
    // Unknown VNI, and a frame for another endpoint.
    let inner = udp64(VM1, RVM_A, ip("10.0.1.50"), ip("10.0.1.10"));
    let (d, _) = run(&t, UL, &from_remote(&t, 999, &inner));
    assert_eq!(d.verdict, Verdict::Drop(DropReason::OverlayUnknownVni));
    let mut other = from_remote(&t, 100, &inner);
    other[33] = 9; // outer destination 198.18.0.9 (checksum no longer matters)
    let (d, _) = run(&t, UL, &other);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::OverlayNotForUs));
    // A bad outer checksum is malformed.
    let mut bad = from_remote(&t, 100, &inner);
    bad[24] ^= 0xff;
    let (d, _) = run(&t, UL, &bad);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::OverlayMalformed));
}

#[test]
fn trace_shows_vni_and_endpoint() {
    let t = tables();
    let f = udp64(RVM_A, VM1, ip("10.0.1.10"), ip("10.0.1.50"));
    let mut buf = f.clone();
    buf.resize(2048, 0);
    let mut len = f.len();
    let mut tr = RecordTrace::default();
    process(&t, &mut Learned::new(0), P0, &mut buf, &mut len, &mut tr);
    let step = tr
        .steps
        .iter()
        .find(|s| s.stage == "overlay_encap")
        .unwrap();
    assert!(step.decision.contains("VNI 100"), "{step:?}");
    assert!(step.decision.contains("198.18.0.2"), "{step:?}");
    let inner = udp64(VM1, RVM_A, ip("10.0.1.50"), ip("10.0.1.10"));
    let mut buf = from_remote(&t, 100, &inner);
    let mut len = buf.len();
    buf.resize(2048, 0);
    let mut tr = RecordTrace::default();
    process(&t, &mut Learned::new(0), UL, &mut buf, &mut len, &mut tr);
    assert!(
        tr.steps
            .iter()
            .any(|s| s.stage == "overlay_decap" && s.decision.contains("VNI 100")),
        "{tr:?}"
    );
}

#[test]
fn too_big_with_df_gets_fragmentation_needed() {
    let t = tables();
    // 1500-byte IP packet (DF set by the builder): 1550 once encapsulated.
    let f = icmp_echo(RVM_A, VM1, ip("10.0.1.10"), ip("10.0.1.50"), 64, &[0; 1472]);
    let (d, out) = run(&t, P0, &f);
    assert_eq!(d.verdict, Verdict::Reply);
    assert_eq!(d.outcome, Some(Outcome::IcmpFragNeeded));
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1450);
    assert_eq!(crate::packet::checksum::internet_checksum(icmp), 0);
    // Without DF: counted drop (no fragmentation).
    let mut nodf = f.clone();
    nodf[20] = 0;
    nodf[24..26].copy_from_slice(&[0, 0]);
    let c = crate::packet::checksum::internet_checksum(&nodf[14..34]);
    nodf[24..26].copy_from_slice(&c.to_be_bytes());
    let (d, _) = run(&t, P0, &nodf);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::OverlayTooBig));
    // 1450 bytes fit.
    let f = icmp_echo(RVM_A, VM1, ip("10.0.1.10"), ip("10.0.1.50"), 64, &[0; 1422]);
    assert!(matches!(run(&t, P0, &f).0.verdict, Verdict::Tunnel { .. }));
}

#[test]
fn overlay_compiles_remote_and_tunnel_ports() {
    let t = tables();
    let o = t.overlay.as_ref().unwrap();
    assert_eq!(o.port, UL);
    assert_eq!(t.switches[0].vni, Some(100));
    assert_eq!(t.switches[0].flood_endpoints, vec![0]);
    assert_eq!(t.switches[2].vni, None);
    let rvm = t.lports.iter().find(|l| l.name == "rvm_a").unwrap();
    assert_eq!(rvm.remote, Some(0));
    assert!(t.switches[0].arp.contains_key(&u32::from(ip("10.0.1.50"))));
    let tunnel = t.switches[0].tunnel_lport.unwrap();
    assert!(t.lports[tunnel as usize].tunnel);
    assert!(!t.switches[0].members.contains(&tunnel));
}

fn ov(s: &mut crate::model::DesiredState) -> &mut crate::overlay::OverlaySpec {
    s.overlay.as_deref_mut().unwrap()
}

fn overlay_err(f: impl FnOnce(&mut crate::model::DesiredState)) -> ConfigError {
    let mut s = overlay_topology(Encapsulation::Geneve);
    f(&mut s);
    compile(&s, &overlay_interfaces(), 1).unwrap_err()
}

#[test]
fn invalid_overlay_is_named() {
    let e = overlay_err(|s| ov(s).switches[1].vni = 100);
    assert_eq!(
        e,
        ConfigError::Overlay(OverlayError::DuplicateVni {
            vni: 100,
            first: "a".into(),
            second: "b".into()
        })
    );
    let e = overlay_err(|s| ov(s).switches[0].vni = 1 << 24);
    assert!(matches!(e, ConfigError::Overlay(OverlayError::BadVni { vni, .. }) if vni == 1 << 24));
    let e = overlay_err(|s| ov(s).interface = "nope".into());
    assert!(matches!(
        e,
        ConfigError::Overlay(OverlayError::UnknownInterface(_))
    ));
    let e = overlay_err(|s| ov(s).interface = "p0".into());
    assert!(
        matches!(e, ConfigError::Overlay(OverlayError::InterfaceInUse { ref port, .. }) if port == "vm1")
    );
    let e = overlay_err(|s| ov(s).remote_ports[0].endpoint = "198.18.0.9".into());
    assert!(matches!(
        e,
        ConfigError::Overlay(OverlayError::UnknownEndpoint { .. })
    ));
    let e = overlay_err(|s| ov(s).remote_ports[0].switch = "v".into());
    assert!(matches!(
        e,
        ConfigError::Overlay(OverlayError::SwitchWithoutVni { .. })
    ));
    let e = overlay_err(|s| ov(s).remote_ports[0].name = "vm1".into());
    assert!(matches!(e, ConfigError::DuplicateName { .. }));
    let e = overlay_err(|s| ov(s).remote_ports[1].name = "rvm_a".into());
    assert!(matches!(e, ConfigError::DuplicateName { ref name, .. } if name == "rvm_a"));
    let e = overlay_err(|s| ov(s).remote_ports[0].ips = vec!["10.0.9.9".into()]);
    assert!(matches!(e, ConfigError::IpOutsideSubnet { .. }));
    let e = overlay_err(|s| ov(s).remote_ports[0].mac = "02:00:00:00:00:01".into());
    assert!(matches!(e, ConfigError::DuplicateMac { .. }));
    let e = overlay_err(|s| ov(s).mtu = 100);
    assert!(matches!(e, ConfigError::Overlay(OverlayError::BadMtu(100))));
    let e = overlay_err(|s| ov(s).endpoints[0].ip = "198.18.0.1".into());
    assert!(matches!(
        e,
        ConfigError::Overlay(OverlayError::DuplicateEndpoint(_))
    ));

    // A rejected apply leaves the running tables.
    let h = ConfigHandle::new(overlay_interfaces());
    let g = h.apply(overlay_topology(Encapsulation::Vxlan)).unwrap();
    let mut bad = overlay_topology(Encapsulation::Geneve);
    bad.overlay.as_mut().unwrap().switches[0].vni = u32::MAX;
    assert!(h.apply(bad).is_err());
    let t = h.tables().load_full();
    assert_eq!(t.generation, g);
    assert_eq!(t.overlay.as_ref().unwrap().encap, Encapsulation::Vxlan);
}

proptest! {
    /// Whatever arrives on the underlay, tunnel-shaped or not, is counted and
    /// dropped or forwarded: never a panic.
    #[test]
    fn random_underlay_frames_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..120),
        cut in 0usize..200,
        vxlan in any::<bool>(),
    ) {
        let encap = if vxlan { Encapsulation::Vxlan } else { Encapsulation::Geneve };
        let t = compile(&overlay_topology(encap), &overlay_interfaces(), 1).unwrap();
        let mut f = from_remote(&t, 100, &tail);
        f.truncate(cut.max(1));
        let _ = run(&t, UL, &f);
        let _ = run(&t, UL, &tail);
    }
}

/// Runs `frames` from interface `from` through a worker on `t`; returns
/// what each interface got.
fn run_worker(
    t: crate::model::DesiredState,
    from: usize,
    frames: Vec<Vec<u8>>,
) -> Vec<Vec<Vec<u8>>> {
    run_worker_stats(t, from, frames).0
}

/// [`run_worker`], also returning the counters.
fn run_worker_stats(
    t: crate::model::DesiredState,
    from: usize,
    frames: Vec<Vec<u8>>,
) -> (Vec<Vec<Vec<u8>>>, crate::counters::StatsSnapshot) {
    use crate::port::{MemPort, Port};
    use std::sync::Arc;
    let names = overlay_interfaces();
    let config = ConfigHandle::new(names.clone());
    config.apply(t).unwrap();
    let n = frames.len() as u64;
    let mut sinks = Vec::new();
    let ports: Vec<Box<dyn Port>> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let p = if i == from {
                MemPort::generator(name, frames.clone(), n)
            } else {
                MemPort::sink(name).capturing()
            };
            sinks.push(p.counters());
            Box::new(p) as Box<dyn Port>
        })
        .collect();
    let stats = Arc::new(crate::counters::Stats::new(&names));
    let mut w = crate::engine::Worker::new(ports, config.tables(), Arc::clone(&stats));
    while w.poll_once() > 0 {}
    let got = sinks
        .iter()
        .map(|s| s.captured.lock().unwrap().clone())
        .collect();
    (got, stats.snapshot())
}

#[test]
fn decapsulated_flows_are_replayed_from_the_flow_cache() {
    let state = overlay_topology(Encapsulation::Geneve);
    let t = compile(&state, &overlay_interfaces(), 1).unwrap();
    let inner = udp64(VM1, RVM_A, ip("10.0.1.50"), ip("10.0.1.10"));
    let loopy = udp64(RVM_A, [2, 0, 0, 0, 0, 2], ip("10.0.1.11"), ip("10.0.1.50"));
    let outer = from_remote(&t, 100, &inner);
    let frames = vec![
        outer.clone(),
        outer.clone(),
        outer,
        from_remote(&t, 100, &loopy),
        from_remote(&t, 100, &loopy),
    ];
    let (got, snap) = run_worker_stats(state, usize::from(UL), frames);
    assert_eq!(
        got[usize::from(P0)],
        vec![inner.clone(), inner.clone(), inner]
    );
    assert!(
        got[usize::from(UL)].is_empty(),
        "never back into the tunnel"
    );
    assert_eq!(snap.outcomes["overlay_decap"], 5, "{snap:?}");
    assert_eq!(snap.flow_cache["hits"], 3, "{snap:?}");
    assert_eq!(
        snap.port("ul").unwrap().drops["overlay_loop"],
        2,
        "{snap:?}"
    );
}

#[test]
fn floods_are_replicated_to_endpoints_but_never_back_into_the_tunnel() {
    let state = overlay_topology(Encapsulation::Geneve);
    let t = compile(&state, &overlay_interfaces(), 1).unwrap();
    let bcast = udp64([0xff; 6], VM1, ip("10.0.1.10"), ip("10.0.1.255"));
    let got = run_worker(state.clone(), usize::from(P0), vec![bcast.clone()]);
    // Local members of switch a (vm2 on p1, the uplink) and one copy to 198.18.0.2.
    assert_eq!(got[1].len(), 1);
    assert_eq!(got[4].len(), 1);
    let ul = &got[usize::from(UL)];
    assert_eq!(ul.len(), 1, "one copy per endpoint");
    let (vni, hlen) = crate::overlay::parse_tunnel(Encapsulation::Geneve, &ul[0][42..]).unwrap();
    assert_eq!((vni, hlen), (100, 8));
    assert_eq!(&ul[0][50..], &bcast[..]);
    assert_eq!(&ul[0][30..34], &[198, 18, 0, 2]);
    // Unicast to the remote port: encapsulated, on the underlay only.
    let f = udp64(RVM_A, VM1, ip("10.0.1.10"), ip("10.0.1.50"));
    let got = run_worker(state.clone(), usize::from(P0), vec![f.clone(), f.clone()]);
    assert_eq!(
        got[usize::from(UL)].len(),
        2,
        "the second one from the flow cache"
    );
    assert!(got[usize::from(UL)].iter().all(|o| o[50..] == f[..]));
    assert_eq!(got[usize::from(UL)][0], got[usize::from(UL)][1]);
    // A broadcast out of the tunnel reaches the local members only.
    let inner = udp64([0xff; 6], RVM_A, ip("10.0.1.50"), ip("10.0.1.255"));
    let got = run_worker(state, usize::from(UL), vec![from_remote(&t, 100, &inner)]);
    assert_eq!(got[usize::from(P0)], vec![inner.clone()]);
    assert_eq!(got[1], vec![inner]);
    assert!(got[usize::from(UL)].is_empty());
}
