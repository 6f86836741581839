//! Benchmark kernels for `keel bench dataplane`: an in-memory generator
//! port → one worker → an in-memory sink port, and the peer: the same
//! generator → sink with no pipeline (the I/O ceiling of these ports).
//!
//! Lives here (not in keel-bench) so the crate's tests can check that every
//! scenario forwards what it should, without timing anything.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::config::ConfigHandle;
use crate::counters::Stats;
use crate::engine::Worker;
use crate::model::{DesiredState, PortSpec, RouterPortSpec, RouterSpec, SwitchSpec};
use crate::packet::build::udp64;
use crate::packet::headers::{mac_to_string, Mac};
use crate::port::{MemPort, PacketBuf, Port, BATCH};

/// What a scenario forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// L2 switching to `n` bound destination MACs.
    L2 { macs: u32 },
    /// L2 → distributed router → L2, to `n` hosts on the far subnet.
    Routed { hosts: u32 },
}

/// One timed run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub generated: u64,
    pub delivered: u64,
    pub seconds: f64,
}

impl Run {
    /// Million packets per second delivered.
    pub fn mpps(&self) -> f64 {
        self.delivered as f64 / self.seconds / 1e6
    }
    /// Nanoseconds per packet.
    pub fn ns_per_packet(&self) -> f64 {
        self.seconds * 1e9 / self.delivered.max(1) as f64
    }
}

const SRC: Mac = [2, 0, 0, 0, 0, 1];
const GW_A: Mac = [2, 0, 0, 0, 0xff, 1];

fn host_mac(i: u32) -> Mac {
    let b = i.to_be_bytes();
    [2, 0, 1, b[1], b[2], b[3]]
}

fn port(name: String, switch: &str, interface: &str, mac: Mac, ip: Ipv4Addr) -> PortSpec {
    PortSpec {
        name,
        switch: switch.into(),
        interface: interface.into(),
        mac: Some(mac_to_string(&mac)),
        ips: vec![ip.to_string()],
        port_security: true,
    }
}

/// The desired state and the generator's frames (60 bytes: 64 on the wire with FCS).
pub fn scenario(s: Scenario) -> (DesiredState, Vec<Vec<u8>>) {
    let src_ip = Ipv4Addr::new(10, 0, 0, 1);
    let (far_switch, far_net, n) = match s {
        Scenario::L2 { macs } => ("a", Ipv4Addr::new(10, 0, 0, 0), macs),
        Scenario::Routed { hosts } => ("b", Ipv4Addr::new(10, 1, 0, 0), hosts),
    };
    let host_ip = |i: u32| Ipv4Addr::from(u32::from(far_net) + 2 + i);
    let mut state = DesiredState {
        switches: vec![SwitchSpec {
            name: "a".into(),
            subnet: "10.0.0.0/16".into(),
            vlan: None,
            subnet6: None,
            dhcp: None,
        }],
        ports: vec![port("src".into(), "a", "gen", SRC, src_ip)],
        routers: vec![],
    };
    for i in 0..n {
        state.ports.push(port(
            format!("dst{i}"),
            far_switch,
            "sink",
            host_mac(i),
            host_ip(i),
        ));
    }
    let frames = (0..n)
        .map(|i| match s {
            Scenario::L2 { .. } => udp64(host_mac(i), SRC, src_ip, host_ip(i)),
            Scenario::Routed { .. } => udp64(GW_A, SRC, src_ip, host_ip(i)),
        })
        .collect();
    if let Scenario::Routed { .. } = s {
        state.switches.push(SwitchSpec {
            name: "b".into(),
            subnet: "10.1.0.0/16".into(),
            vlan: None,
            subnet6: None,
            dhcp: None,
        });
        state.routers.push(RouterSpec {
            name: "r".into(),
            ports: vec![
                RouterPortSpec {
                    switch: "a".into(),
                    mac: mac_to_string(&GW_A),
                    ip: "10.0.255.254".into(),
                    ip6: None,
                },
                RouterPortSpec {
                    switch: "b".into(),
                    mac: "02:00:00:00:ff:02".into(),
                    ip: "10.1.255.254".into(),
                    ip6: None,
                },
            ],
            static_routes: vec![],
        });
    }
    (state, frames)
}

fn interfaces() -> Vec<String> {
    vec!["gen".into(), "sink".into()]
}

/// Generator → worker (full pipeline) → sink, for `packets` frames.
pub fn run_pipeline(s: Scenario, packets: u64) -> Result<Run, crate::config::ConfigError> {
    let (state, frames) = scenario(s);
    let config = ConfigHandle::new(interfaces());
    config.apply(state)?;
    let sink = MemPort::sink("sink");
    let delivered = sink.counters();
    let ports: Vec<Box<dyn Port>> = vec![
        Box::new(MemPort::generator("gen", frames, packets)),
        Box::new(sink),
    ];
    let mut worker = Worker::new(ports, config.tables(), Arc::new(Stats::new(&interfaces())));
    let start = Instant::now();
    while worker.poll_once() > 0 {}
    let seconds = start.elapsed().as_secs_f64();
    Ok(Run {
        generated: packets,
        delivered: delivered.packets.load(Ordering::Relaxed),
        seconds,
    })
}

/// The peer: the same generator straight into the same sink, batch by batch.
pub fn run_baseline(s: Scenario, packets: u64) -> Run {
    let (_, frames) = scenario(s);
    let mut generator = MemPort::generator("gen", frames, packets);
    let mut sink = MemPort::sink("sink");
    let delivered = sink.counters();
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::default()).collect();
    let start = Instant::now();
    loop {
        let n = generator.rx_batch(&mut bufs).unwrap_or(0);
        if n == 0 {
            break;
        }
        let _ = sink.tx_batch(bufs.get(..n).unwrap_or(&[]));
    }
    let seconds = start.elapsed().as_secs_f64();
    Run {
        generated: packets,
        delivered: delivered.packets.load(Ordering::Relaxed),
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_delivers_every_packet() {
        for s in [
            Scenario::L2 { macs: 1 },
            Scenario::L2 { macs: 10_000 },
            Scenario::Routed { hosts: 256 },
        ] {
            let run = run_pipeline(s, 20_000).unwrap();
            assert_eq!((run.generated, run.delivered), (20_000, 20_000), "{s:?}");
            let peer = run_baseline(s, 20_000);
            assert_eq!(peer.delivered, 20_000, "{s:?}");
        }
    }
}
