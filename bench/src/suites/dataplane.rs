//! `dataplane`: packets through the VPC data plane's worker on one core,
//! in-memory generator → worker → sink with 64-byte frames, against the peer
//! generator → sink with no pipeline (the ceiling of the in-memory ports).
//! The ratio is the share of the I/O ceiling the pipeline keeps.
//!
//! Stateful scenarios (security groups + conntrack, SNAT, the L4 load
//! balancer) are measured against the same frames with the feature off (for
//! the LB: the same flows routed straight to its members), so their ratio is
//! the share of stateless routed forwarding speed they keep.
//!
//! The flow cache (on in every scenario above, as in the daemon) is measured
//! against the same pipeline with the cache off, in the same process.
//!
//! Worker scaling: 2 worker threads (each with its own generator and sink,
//! pinned to the two allowed CPUs) against 1, same tables and frames, in
//! the same process; the ratio is the 1→2 speed-up (goal ≥ 1.8). "Steered"
//! feeds each worker only its own flows (symmetric RSS / eBPF fanout);
//! "mixed" feeds each all flows, so half cross a handoff lane (AF_PACKET's
//! fanout hash). On a shared 2-core machine other load lowers the ratio:
//! the control row runs a pipeline-free copy loop on 2 threads vs 1 in the
//! same process, so the workers' ratio can be read against what the
//! machine gave two threads at that moment.
//!
//! Overlay: "Geneve encap+decap" is host A's worker (switch, encapsulate)
//! then host B's worker (decapsulate, switch) on the same core, 64-byte
//! inner frames to 256 remote ports; its Mpps and cycles per packet cover
//! both halves (goal ≥ 7 Mpps/core). The peer switches the same frames on
//! each host without a tunnel (two L2 passes). Cycles are TSC cycles.
//!
//! Rounds of keel and peer alternate so noise hits both alike.

use keel_dataplane::bench::{
    run_baseline, run_baseline_threads, run_overlay, run_overlay_peer, run_pipeline,
    run_pipeline_with_cache, run_service, run_stateful, run_workers, Feed, Run, Scenario, Service,
    Stateful,
};

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "dataplane",
    about: "VPC data plane: L2 switching and routing, Mpps vs. generator→sink I/O ceiling",
    run,
};

const PEER: &str = "generator→sink, no pipeline (I/O ceiling)";
const ROUNDS: u64 = 5;

fn total(runs: &[Run]) -> Run {
    Run {
        generated: runs.iter().map(|r| r.generated).sum(),
        delivered: runs.iter().map(|r| r.delivered).sum(),
        seconds: runs.iter().map(|r| r.seconds).sum(),
    }
}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    let per_round = match scale {
        Scale::Quick => 100_000,
        Scale::Full => 4_000_000,
    };
    let scenarios = [
        ("L2 switching, 1 MAC", Scenario::L2 { macs: 1 }),
        ("L2 switching, 10k MACs", Scenario::L2 { macs: 10_000 }),
        (
            "L2 → router → L2, 256 hosts",
            Scenario::Routed { hosts: 256 },
        ),
    ];
    let mut out = Vec::new();
    for (name, s) in scenarios {
        let (mut keel, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            keel.push(
                run_pipeline(s, per_round).map_err(|e| BenchError::Io(std::io::Error::other(e)))?,
            );
            peer.push(run_baseline(s, per_round));
        }
        let (keel, peer) = (total(&keel), total(&peer));
        out.push(
            Measurement::new(&format!("{name}: throughput"), "Mpps", true, keel.mpps())
                .with_peer(PEER, peer.mpps()),
        );
        out.push(
            Measurement::new(
                &format!("{name}: cost"),
                "ns/packet",
                false,
                keel.ns_per_packet(),
            )
            .with_peer(PEER, peer.ns_per_packet()),
        );
    }
    overlay(per_round, &mut out)?;
    flow_cache(per_round, &mut out)?;
    scaling(per_round, &mut out)?;
    stateful(scale, &mut out)?;
    services(scale, &mut out)?;
    Ok(out)
}

/// Geneve and VXLAN encap + decap against two plain L2 passes.
fn overlay(per_round: u64, out: &mut Vec<Measurement>) -> Result<(), BenchError> {
    use keel_dataplane::overlay::Encapsulation;
    const PEER: &str = "same frames L2-switched on each host, no tunnel";
    for (name, encap) in [
        (
            "Geneve encap+decap, 256 remote ports",
            Encapsulation::Geneve,
        ),
        ("VXLAN encap+decap, 256 remote ports", Encapsulation::Vxlan),
    ] {
        let (mut keel, mut peer) = (Vec::new(), Vec::new());
        let (mut kc, mut pc) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let (r, c) = run_overlay(256, encap, per_round).map_err(io)?;
            keel.push(r);
            kc.extend(c);
            let (r, c) = run_overlay_peer(256, per_round).map_err(io)?;
            peer.push(r);
            pc.extend(c);
        }
        let (keel, peer) = (total(&keel), total(&peer));
        out.push(
            Measurement::new(&format!("{name}: throughput"), "Mpps", true, keel.mpps())
                .with_peer(PEER, peer.mpps()),
        );
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        if !kc.is_empty() && !pc.is_empty() {
            out.push(
                Measurement::new(&format!("{name}: cost"), "cycles/packet", false, mean(&kc))
                    .with_peer(PEER, mean(&pc)),
            );
        } else {
            out.push(
                Measurement::new(
                    &format!("{name}: cost"),
                    "ns/packet",
                    false,
                    keel.ns_per_packet(),
                )
                .with_peer(PEER, peer.ns_per_packet()),
            );
        }
    }
    Ok(())
}

/// Flow cache on (sized for the flows) against the same pipeline with it off.
fn flow_cache(per_round: u64, out: &mut Vec<Measurement>) -> Result<(), BenchError> {
    const ENTRIES: usize = 32 * 1024;
    let scenarios = [
        (
            "flow cache: L2 switching, 10k MACs",
            Scenario::L2 { macs: 10_000 },
        ),
        (
            "flow cache: L2 → router → L2, 256 hosts",
            Scenario::Routed { hosts: 256 },
        ),
    ];
    for (name, s) in scenarios {
        let (mut keel, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            keel.push(run_pipeline_with_cache(s, per_round, ENTRIES).map_err(io)?);
            peer.push(run_pipeline_with_cache(s, per_round, 0).map_err(io)?);
        }
        let (keel, peer) = (total(&keel), total(&peer));
        out.push(
            Measurement::new(&format!("{name}: throughput"), "Mpps", true, keel.mpps())
                .with_peer("same pipeline, flow cache off", peer.mpps()),
        );
    }
    out.push(Measurement::new(
        "flow cache memory per entry",
        "bytes",
        false,
        keel_dataplane::flowcache::FlowCache::bytes_per_entry() as f64,
    ));
    Ok(())
}

/// 2 workers against 1 on the routed scenario.
fn scaling(per_round: u64, out: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let s = Scenario::Routed { hosts: 256 };
    for (name, feed) in [
        ("2 workers vs 1, routed, steered feed", Feed::Steered),
        (
            "2 workers vs 1, routed, mixed feed (half handed over)",
            Feed::Mixed,
        ),
    ] {
        let (mut two, mut one, mut lane_full) = (Vec::new(), Vec::new(), 0);
        for _ in 0..ROUNDS {
            let (run, full) = run_workers(s, 2, per_round, feed).map_err(io)?;
            lane_full += full;
            two.push(run);
            one.push(run_workers(s, 1, per_round, feed).map_err(io)?.0);
        }
        let (two, one) = (total(&two), total(&one));
        out.push(
            Measurement::new(&format!("{name}: throughput"), "Mpps", true, two.mpps())
                .with_peer("1 worker, same frames", one.mpps()),
        );
        if feed == Feed::Mixed {
            out.push(Measurement::new(
                &format!("{name}: frames dropped, handoff lane full"),
                "frames",
                false,
                lane_full as f64,
            ));
        }
    }
    // The control: what 2 threads get over 1 on this machine right now
    // (a pipeline-free copy loop, nothing shared), for reading the above.
    let (mut two, mut one) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        two.push(run_baseline_threads(s, 2, per_round * 4));
        one.push(run_baseline_threads(s, 1, per_round * 4));
    }
    let (two, one) = (total(&two), total(&one));
    out.push(
        Measurement::new(
            "control: 2 threads vs 1, generator→sink copy loop (machine scaling)",
            "Mpps",
            true,
            two.mpps(),
        )
        .with_peer("1 thread, same loop", one.mpps()),
    );
    Ok(())
}

/// QoS meter + DSCP marking, traffic mirroring, NAT64 and router policies,
/// each against itself switched off.
fn services(scale: Scale, out: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let per_round = match scale {
        Scale::Quick => 100_000,
        Scale::Full => 4_000_000,
    };
    let scenarios = [
        (
            "QoS egress meter + DSCP marking, routed",
            Service::Meter,
            "same frames routed, QoS off",
        ),
        (
            "mirror (ERSPAN II copy of every frame), routed",
            Service::Mirror,
            "same frames routed, mirror off",
        ),
        (
            "NAT64 (IPv6 → IPv4 translation, 256 sessions)",
            Service::Nat64,
            "same IPv6 frames routed natively, NAT64 off",
        ),
        (
            "16 router policies (match on the last), routed",
            Service::Policy,
            "same frames routed, no policies",
        ),
    ];
    for (name, s, peer_name) in scenarios {
        let (mut keel, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            keel.push(run_service(s, true, per_round).map_err(io)?.0);
            peer.push(run_service(s, false, per_round).map_err(io)?.0);
        }
        let (keel, peer) = (total(&keel), total(&peer));
        out.push(
            Measurement::new(&format!("{name}: throughput"), "Mpps", true, keel.mpps())
                .with_peer(peer_name, peer.mpps()),
        );
    }
    Ok(())
}

fn io(e: keel_dataplane::config::ConfigError) -> BenchError {
    BenchError::Io(std::io::Error::other(e))
}

/// Security groups + conntrack and SNAT, each against itself switched off.
fn stateful(scale: Scale, out: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let (flows, per_round) = match scale {
        Scale::Quick => (10_000, 100_000),
        Scale::Full => (100_000, 4_000_000),
    };
    let sg = Stateful::SecurityGroups {
        hosts: 256,
        rules: 100,
        flows,
    };
    let snat = Stateful::Snat { flows: flows / 2 };
    let scenarios = [
        (
            format!("security groups (100 rules) + conntrack, {flows} flows"),
            sg,
            "same frames, security groups off",
        ),
        (
            format!("SNAT, {} flows", flows / 2),
            snat,
            "same frames routed, NAT off",
        ),
    ];
    let mut bytes_per_conn = 0;
    for (name, s, peer_name) in scenarios {
        let (mut keel, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let (run, bytes) = run_stateful(s, true, per_round).map_err(io)?;
            bytes_per_conn = bytes;
            keel.push(run);
            peer.push(run_stateful(s, false, per_round).map_err(io)?.0);
        }
        let (keel, peer) = (total(&keel), total(&peer));
        out.push(
            Measurement::new(&format!("{name}: throughput"), "Mpps", true, keel.mpps())
                .with_peer(peer_name, peer.mpps()),
        );
    }
    // Connection setup: one pass, every packet opens a connection (100 rules checked).
    let (mut keel, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        keel.push(run_stateful(sg, true, u64::from(flows)).map_err(io)?.0);
        peer.push(run_stateful(sg, false, u64::from(flows)).map_err(io)?.0);
    }
    let (keel, peer) = (total(&keel), total(&peer));
    out.push(
        Measurement::new(
            "new connections through 100-rule security groups",
            "M conn/s",
            true,
            keel.mpps(),
        )
        .with_peer(
            "same first packets, security groups off (Mpps)",
            peer.mpps(),
        ),
    );
    // Set matches against their expansion: one rule naming a 1000-prefix
    // address group and a 64-range port set, against 1000 CIDR rules.
    let sets = Stateful::SecurityGroupSets {
        hosts: 256,
        prefixes: 1000,
        flows,
    };
    let (mut keel, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        keel.push(run_stateful(sets, true, u64::from(flows)).map_err(io)?.0);
        peer.push(run_stateful(sets, false, u64::from(flows)).map_err(io)?.0);
    }
    let (keel, peer) = (total(&keel), total(&peer));
    out.push(
        Measurement::new(
            "new connections through one rule with a 1000-prefix address group and a 64-range port set",
            "M conn/s",
            true,
            keel.mpps(),
        )
        .with_peer("the same policy expanded to 1000 CIDR rules", peer.mpps()),
    );
    lb4(flows, per_round, out)?;
    out.push(Measurement::new(
        "conntrack memory per connection",
        "bytes",
        false,
        bytes_per_conn as f64,
    ));
    Ok(())
}

/// L4 load balancing (Maglev pick + DNAT, conntrack affinity) against the
/// same number of flows routed straight to the members, LB off: on
/// established flows, then one pass in which every packet is a new
/// connection.
fn lb4(flows: u32, per_round: u64, out: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let s = Stateful::Lb4 { members: 16, flows };
    let peer_name = "same flows routed to the members, LB off";
    let (mut keel, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        keel.push(run_stateful(s, true, per_round).map_err(io)?.0);
        peer.push(run_stateful(s, false, per_round).map_err(io)?.0);
    }
    let (keel, peer) = (total(&keel), total(&peer));
    out.push(
        Measurement::new(
            &format!("L4 LB (Maglev + DNAT), 16 members, {flows} established flows: throughput"),
            "Mpps",
            true,
            keel.mpps(),
        )
        .with_peer(peer_name, peer.mpps()),
    );
    let (mut keel, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        keel.push(run_stateful(s, true, u64::from(flows)).map_err(io)?.0);
        peer.push(run_stateful(s, false, u64::from(flows)).map_err(io)?.0);
    }
    let (keel, peer) = (total(&keel), total(&peer));
    out.push(
        Measurement::new(
            "L4 LB new connections (Maglev pick + DNAT + conntrack entry)",
            "M conn/s",
            true,
            keel.mpps(),
        )
        .with_peer("same first packets routed, LB off (Mpps)", peer.mpps()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_run_reports_every_scenario_with_its_peer() {
        let ms = run(Scale::Quick).unwrap();
        assert_eq!(ms.len(), 28);
        for m in ms
            .iter()
            .filter(|m| m.unit != "bytes" && m.unit != "frames")
        {
            assert!(m.value > 0.0 && m.ratio.is_some_and(|r| r > 0.0), "{m:?}");
        }
    }
}
