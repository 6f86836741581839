//! The flow cache changes nothing but speed: the same frames out of the same
//! ports and the same counters with the cache on as with it off.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;

use crate::config::ConfigHandle;
use crate::counters::{Stats, StatsSnapshot};
use crate::engine::Worker;
use crate::model::{DesiredState, SecurityGroupSpec, SecurityRuleSpec};
use crate::packet::headers::Mac;
use crate::packet::parse::build;
use crate::port::{MemPort, Port, SinkCounters};
use crate::testutil::{interfaces, topology};

const MACS: [Mac; 10] = [
    [2, 0, 0, 0, 0, 1],
    [2, 0, 0, 0, 0, 2],
    [2, 0, 0, 0, 0, 3],
    [2, 0, 0, 0, 0, 4],
    [2, 0, 0, 0, 0xff, 1],
    [2, 0, 0, 0, 0xff, 2],
    [2, 0, 0, 0, 0xff, 3],
    [0xff; 6],
    [2, 0, 0, 0, 0xaa, 1],
    [2, 0, 0, 0, 0xaa, 2],
];
const IPS: [[u8; 4]; 9] = [
    [10, 0, 1, 10],
    [10, 0, 1, 11],
    [10, 0, 2, 10],
    [10, 0, 3, 10],
    [192, 0, 2, 5],
    [10, 0, 1, 1],
    [10, 0, 2, 1],
    [10, 0, 1, 50],
    [10, 0, 9, 9],
];

#[derive(Debug, Clone)]
struct FrameSpec {
    dst: usize,
    src: usize,
    sip: usize,
    dip: usize,
    vlan: bool,
    ttl: u8,
    kind: u8,
    port: u16,
    payload: Vec<u8>,
}

fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    (
        0..MACS.len(),
        0..MACS.len(),
        0..IPS.len(),
        0..IPS.len(),
        prop::bool::weighted(0.2),
        prop::sample::select(vec![1u8, 2, 64]),
        0u8..5,
        prop::sample::select(vec![53u16, 67, 68, 80, 443, 5000]),
        prop::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(
            |(dst, src, sip, dip, vlan, ttl, kind, port, payload)| FrameSpec {
                dst,
                src,
                sip,
                dip,
                vlan,
                ttl,
                kind,
                port,
                payload,
            },
        )
}

fn build_frame(f: &FrameSpec) -> Vec<u8> {
    let (dst, src) = (MACS[f.dst], MACS[f.src]);
    let (sip, dip) = (Ipv4Addr::from(IPS[f.sip]), Ipv4Addr::from(IPS[f.dip]));
    let vlan = f.vlan.then_some(100);
    let mut l4 = match f.kind {
        // ICMP echo
        0 => vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1],
        // UDP
        1 | 2 => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&5555u16.to_be_bytes());
            u[2..4].copy_from_slice(&f.port.to_be_bytes());
            u
        }
        // TCP
        3 => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&40000u16.to_be_bytes());
            h[2..4].copy_from_slice(&f.port.to_be_bytes());
            h[12] = 0x50;
            h[13] = 0x02;
            h
        }
        _ => {
            return build::arp(1, dst, src, sip, [0; 6], dip, vlan);
        }
    };
    l4.extend_from_slice(&f.payload);
    let proto = match f.kind {
        0 => 1,
        3 => 6,
        _ => 17,
    };
    build::ipv4(dst, src, vlan, sip, dip, f.ttl, proto, &l4)
}

/// A variant of the test topology: plain, or with security groups (which
/// keep the cache inactive), or without the static route.
fn config(variant: u8) -> DesiredState {
    let mut s = topology();
    match variant {
        1 => {
            s.security_groups = vec![SecurityGroupSpec {
                name: "web".into(),
                ports: vec!["vm2".into()],
                rules: vec![SecurityRuleSpec {
                    direction: crate::model::RuleDirection::Ingress,
                    ethertype: Default::default(),
                    protocol: Some("tcp".into()),
                    port_min: Some(80),
                    port_max: None,
                    icmp_type: None,
                    icmp_code: None,
                    remote_cidr: None,
                    remote_group: None,
                    remote_address_group: None,
                    port_set: None,
                    priority: 0,
                    action: crate::model::RuleAction::Allow,
                }],
            }];
        }
        2 => s.routers[0].static_routes.clear(),
        _ => {}
    }
    s
}

struct Run {
    captured: Vec<Vec<Vec<u8>>>,
    stats: StatsSnapshot,
}

/// Runs the per-port frame lists through one worker; after `rounds` polling
/// rounds the configuration switches to `second`.
fn run(cache: usize, first: u8, second: u8, rounds: usize, per_port: &[Vec<Vec<u8>>]) -> Run {
    let handle = ConfigHandle::new(interfaces());
    handle.apply(config(first)).unwrap();
    let ports: Vec<MemPort> = interfaces()
        .iter()
        .zip(per_port)
        .map(|(n, frames)| {
            let count = if frames.is_empty() {
                0
            } else {
                frames.len() as u64 * 3
            };
            MemPort::generator(n, frames.clone(), count).capturing()
        })
        .collect();
    let sinks: Vec<Arc<SinkCounters>> = ports.iter().map(MemPort::counters).collect();
    let ports: Vec<Box<dyn Port>> = ports
        .into_iter()
        .map(|p| Box::new(p) as Box<dyn Port>)
        .collect();
    let stats = Arc::new(Stats::new(&interfaces()));
    let mut w = Worker::new(ports, handle.tables(), Arc::clone(&stats)).with_flow_cache(cache);
    for _ in 0..rounds {
        w.poll_once();
    }
    handle.apply(config(second)).unwrap();
    while w.poll_once() > 0 {}
    let mut snap = stats.snapshot();
    snap.flow_cache.clear();
    Run {
        captured: sinks
            .iter()
            .map(|s| {
                assert_eq!(
                    s.packets.load(Ordering::Relaxed),
                    s.captured.lock().unwrap().len() as u64
                );
                s.captured.lock().unwrap().clone()
            })
            .collect(),
        stats: snap,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn cache_on_equals_cache_off(
        per_port in prop::collection::vec(prop::collection::vec(frame_spec(), 0..12), 5),
        first in 0u8..3,
        second in 0u8..3,
        rounds in 0usize..3,
        entries in prop::sample::select(vec![2usize, 8, 4096]),
    ) {
        let frames: Vec<Vec<Vec<u8>>> =
            per_port.iter().map(|p| p.iter().map(build_frame).collect()).collect();
        let off = run(0, first, second, rounds, &frames);
        let on = run(entries, first, second, rounds, &frames);
        prop_assert_eq!(&on.captured, &off.captured);
        prop_assert_eq!(&on.stats, &off.stats);
    }
}

#[test]
fn repeated_flows_hit_and_config_change_invalidates() {
    let vm1 = [2, 0, 0, 0, 0, 1];
    let frames = vec![
        // L2 vm1 → vm2, routed vm1 → vm3.
        build::udp64(
            [2, 0, 0, 0, 0, 2],
            vm1,
            "10.0.1.10".parse().unwrap(),
            "10.0.1.11".parse().unwrap(),
        ),
        build::udp64(
            [2, 0, 0, 0, 0xff, 1],
            vm1,
            "10.0.1.10".parse().unwrap(),
            "10.0.2.10".parse().unwrap(),
        ),
    ];
    let handle = ConfigHandle::new(interfaces());
    handle.apply(topology()).unwrap();
    let ports: Vec<Box<dyn Port>> = interfaces()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = if i == 0 {
                MemPort::generator(n, frames.clone(), 200)
            } else {
                MemPort::sink(n)
            };
            Box::new(p) as Box<dyn Port>
        })
        .collect();
    let stats = Arc::new(Stats::new(&interfaces()));
    let mut w = Worker::new(ports, handle.tables(), Arc::clone(&stats));
    w.poll_once();
    let c = stats.snapshot().flow_cache;
    assert_eq!((c["hits"], c["misses"]), (30, 2));
    handle.apply(config(2)).unwrap();
    while w.poll_once() > 0 {}
    let snap = stats.snapshot();
    assert_eq!(
        snap.flow_cache["misses"], 4,
        "two misses again after the config change"
    );
    assert_eq!(snap.flow_cache["hits"], 196);
    assert!(snap.flow_cache["invalidations"] >= 2);
    assert_eq!(snap.outcomes["routed"], 100);
    assert_eq!(snap.port("p2").unwrap().tx_packets, 100);
}

#[test]
fn stateful_tables_keep_the_cache_inactive_and_tiny_caches_evict() {
    let t = crate::config::compile(&config(1), &interfaces(), 1).unwrap();
    assert!(!crate::flowcache::tables_cacheable(&t));
    let t = crate::config::compile(&config(0), &interfaces(), 1).unwrap();
    assert!(crate::flowcache::tables_cacheable(&t));
    let frames: Vec<Vec<u8>> = (0..40u8)
        .map(|i| {
            build::udp64(
                [2, 0, 0, 0, 0, 2],
                [2, 0, 0, 0, 0, 1],
                "10.0.1.10".parse().unwrap(),
                Ipv4Addr::new(10, 0, 1, i),
            )
        })
        .collect();
    let r = run(2, 0, 0, 0, &[frames, vec![], vec![], vec![], vec![]]);
    assert_eq!(r.stats.outcomes["l2_unicast"], 120);
}
