//! Counters: one per outcome and one per drop reason, per interface.
//!
//! Workers count into plain arrays and fold them into the shared atomics
//! once per polling round (Cloud Hypervisor's queue-pair pattern; with
//! several workers every [`crate::engine::FOLD_ROUNDS`] busy rounds and
//! whenever idle), so the hot path never touches a shared cache line per
//! packet.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::Serialize;

use crate::packet::ParseError;

macro_rules! counted_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant,)* }
        impl $name {
            /// Every variant, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// Number of variants.
            pub const COUNT: usize = Self::ALL.len();
            /// Counter name.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
            /// Counter index.
            pub fn index(self) -> usize { self as usize }
        }
    };
}

counted_enum!(
    /// Why a frame was dropped.
    DropReason {
        MalformedEthernet => "malformed_ethernet",
        MalformedVlan => "malformed_vlan",
        MalformedArp => "malformed_arp",
        MalformedIpv4 => "malformed_ipv4",
        MalformedIpv6 => "malformed_ipv6",
        MalformedL4 => "malformed_l4",
        Oversize => "oversize",
        UnknownIngress => "unknown_ingress",
        SpoofedMac => "spoofed_mac",
        SpoofedIp => "spoofed_ip",
        Hairpin => "hairpin",
        RouterNotIpv4 => "router_not_ip",
        HopLimitExceeded => "hop_limit_exceeded",
        NoRoute6 => "no_route_ipv6",
        BadIpv4Checksum => "bad_ipv4_checksum",
        RouterLocalUnsupported => "router_local_unsupported",
        NoNeighbor => "no_neighbor",
        IcmpErrorSuppressed => "icmp_error_suppressed",
        TxFailed => "tx_failed",
        SecurityGroupDenied => "security_group_denied",
        CtInvalid => "ct_invalid",
        CtTableFull => "ct_table_full",
        UntrackedFragment => "untracked_fragment",
        FirewallDenied => "firewall_denied",
        NatPortsExhausted => "nat_ports_exhausted",
        MalformedDhcp => "malformed_dhcp",
        DhcpNotAnswered => "dhcp_not_answered",
        QosMeterDropped => "qos_meter_dropped",
        Nat64Unsupported => "nat64_unsupported",
        Nat64NoSession => "nat64_no_session",
        PolicyDropped => "router_policy_dropped",
        HandoffFull => "handoff_full",
        LbNoMemberUp => "lb_no_member_up",
        OverlayNotForUs => "overlay_not_for_us",
        OverlayMalformed => "overlay_malformed",
        OverlayUnknownVni => "overlay_unknown_vni",
        OverlayLoop => "overlay_loop",
        OverlayTooBig => "overlay_too_big",
    }
);

counted_enum!(
    /// What the pipeline did with a frame that was not dropped.
    Outcome {
        L2Unicast => "l2_unicast",
        L2Flood => "l2_flood",
        ArpReplied => "arp_replied",
        NdReplied => "nd_replied",
        Routed => "routed",
        RouterEchoReplied => "router_echo_replied",
        IcmpTimeExceeded => "icmp_time_exceeded_sent",
        IcmpNetUnreachable => "icmp_net_unreachable_sent",
        MacLearned => "mac_learned",
        DhcpOffered => "dhcp_offer_sent",
        DhcpAcked => "dhcp_ack_sent",
        DhcpNaked => "dhcp_nak_sent",
        Nat64To4 => "nat64_translated_6to4",
        Nat64To6 => "nat64_translated_4to6",
        ArpRequested => "arp_requested",
        NeighborLearned => "neighbor_learned",
        LbProbeAnswered => "lb_probe_answered",
        LbProbeRefused => "lb_probe_refused",
        OverlayEncap => "overlay_encap",
        OverlayDecap => "overlay_decap",
        IcmpFragNeeded => "icmp_frag_needed_sent",
        Icmp6PacketTooBig => "icmp6_packet_too_big_sent",
    }
);

impl From<ParseError> for DropReason {
    fn from(e: ParseError) -> DropReason {
        match e {
            ParseError::TruncatedEthernet => DropReason::MalformedEthernet,
            ParseError::TruncatedVlan | ParseError::StackedVlan => DropReason::MalformedVlan,
            ParseError::TruncatedArp | ParseError::UnsupportedArp => DropReason::MalformedArp,
            ParseError::TruncatedIpv4 | ParseError::BadIpv4Header | ParseError::BadIpv4Length => {
                DropReason::MalformedIpv4
            }
            ParseError::TruncatedIpv6
            | ParseError::BadIpv6Length
            | ParseError::TruncatedIpv6Extension
            | ParseError::TooManyIpv6Extensions => DropReason::MalformedIpv6,
            ParseError::TruncatedL4 => DropReason::MalformedL4,
        }
    }
}

/// A worker's private counts for one interface.
#[derive(Debug, Clone, Copy)]
pub struct LocalPortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl Default for LocalPortCounters {
    fn default() -> Self {
        LocalPortCounters {
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
            drops: [0; DropReason::COUNT],
        }
    }
}

/// Shared counters of one interface.
#[derive(Debug)]
pub struct PortCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub drops: [AtomicU64; DropReason::COUNT],
}

// (Arrays implement Default only up to 32 entries.)
impl Default for PortCounters {
    fn default() -> Self {
        PortCounters {
            rx_packets: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Shared counters of a data plane.
#[derive(Debug)]
pub struct Stats {
    pub interfaces: Vec<String>,
    pub ports: Vec<PortCounters>,
    pub outcomes: [AtomicU64; Outcome::COUNT],
    /// Connection-tracking counters ([`CONNTRACK_COUNTERS`]) summed over workers.
    pub conntrack: [AtomicU64; CONNTRACK_COUNTERS.len()],
    /// Per worker: its own counters and flush requests.
    pub workers: Vec<WorkerCounters>,
    /// Flow-cache counters ([`FLOW_CACHE_COUNTERS`]) summed over workers.
    pub flow_cache: [AtomicU64; FLOW_CACHE_COUNTERS.len()],
}

/// Names of [`Stats::flow_cache`], in index order.
pub const FLOW_CACHE_COUNTERS: [&str; 4] = ["hits", "misses", "evictions", "invalidations"];

/// Names of [`Stats::conntrack`], in index order. `entries` is a gauge.
pub const CONNTRACK_COUNTERS: [&str; 6] = [
    "entries",
    "created",
    "expired",
    "table_full",
    "invalid",
    "flushed",
];

/// Names of [`WorkerCounters::counts`], in index order: frames the worker
/// ran through the pipeline, handed to the owning worker, received from
/// other workers, dropped because the lane to the owner was full.
pub const WORKER_COUNTERS: [&str; 4] = ["processed", "handed_off", "handed_in", "handoff_full"];

/// One worker's shared counters (a cache line pair of its own: workers
/// write theirs every fold, and must not share lines).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters {
    pub counts: [AtomicU64; WORKER_COUNTERS.len()],
    /// Its connection table's size (a gauge).
    pub ct_entries: AtomicU64,
    /// A pending request to flush one conntrack zone (0 = none); the worker
    /// checks it once per round.
    pub ct_flush: AtomicU32,
}

fn add(counter: &AtomicU64, value: &mut u64) {
    if *value != 0 {
        counter.fetch_add(*value, Ordering::Relaxed);
        *value = 0;
    }
}

impl Stats {
    /// Zeroed counters for these interfaces.
    pub fn new(interfaces: &[String]) -> Stats {
        Stats::with_workers(interfaces, 1)
    }

    /// Zeroed counters for these interfaces and `workers` workers.
    pub fn with_workers(interfaces: &[String], workers: usize) -> Stats {
        Stats {
            interfaces: interfaces.to_vec(),
            ports: interfaces.iter().map(|_| PortCounters::default()).collect(),
            outcomes: Default::default(),
            conntrack: Default::default(),
            flow_cache: Default::default(),
            workers: (0..workers.max(1))
                .map(|_| WorkerCounters::default())
                .collect(),
        }
    }

    /// Asks every worker to flush conntrack zone `zone`.
    pub fn request_ct_flush(&self, zone: u32) {
        for w in &self.workers {
            w.ct_flush.store(zone, Ordering::Relaxed);
        }
    }

    /// Adds and zeroes worker `worker`'s conntrack counts; `entries` is its table size.
    pub fn fold_conntrack(
        &self,
        worker: usize,
        c: &mut crate::conntrack::CtCounters,
        entries: usize,
    ) {
        let [_, created, expired, full, invalid, flushed] = &self.conntrack;
        if let Some(w) = self.workers.get(worker) {
            w.ct_entries.store(entries as u64, Ordering::Relaxed);
        }
        add(created, &mut c.created);
        add(expired, &mut c.expired);
        add(full, &mut c.table_full);
        add(invalid, &mut c.invalid);
        add(flushed, &mut c.flushed);
    }

    /// Adds and zeroes worker `worker`'s own counts ([`WORKER_COUNTERS`]).
    pub fn fold_worker(&self, worker: usize, counts: [&mut u64; WORKER_COUNTERS.len()]) {
        if let Some(w) = self.workers.get(worker) {
            for (s, l) in w.counts.iter().zip(counts) {
                add(s, l);
            }
        }
    }

    /// Adds and zeroes a worker's flow-cache counts.
    pub fn fold_flow_cache(&self, c: &mut crate::flowcache::FlowCacheCounters) {
        let [hits, misses, evictions, invalidations] = &self.flow_cache;
        add(hits, &mut c.hits);
        add(misses, &mut c.misses);
        add(evictions, &mut c.evictions);
        add(invalidations, &mut c.invalidations);
    }

    /// Adds and zeroes a worker's local counts (once per polling round).
    pub fn fold(&self, ports: &mut [LocalPortCounters], outcomes: &mut [u64; Outcome::COUNT]) {
        for (shared, local) in self.ports.iter().zip(ports.iter_mut()) {
            add(&shared.rx_packets, &mut local.rx_packets);
            add(&shared.rx_bytes, &mut local.rx_bytes);
            add(&shared.tx_packets, &mut local.tx_packets);
            add(&shared.tx_bytes, &mut local.tx_bytes);
            for (s, l) in shared.drops.iter().zip(local.drops.iter_mut()) {
                add(s, l);
            }
        }
        for (s, l) in self.outcomes.iter().zip(outcomes.iter_mut()) {
            add(s, l);
        }
    }

    /// A serialisable copy (zero drop counters omitted).
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            ports: self
                .interfaces
                .iter()
                .zip(&self.ports)
                .map(|(name, c)| PortSnapshot {
                    interface: name.clone(),
                    rx_packets: get(&c.rx_packets),
                    rx_bytes: get(&c.rx_bytes),
                    tx_packets: get(&c.tx_packets),
                    tx_bytes: get(&c.tx_bytes),
                    drops: DropReason::ALL
                        .iter()
                        .filter_map(|r| {
                            let n = c.drops.get(r.index()).map_or(0, get);
                            (n != 0).then(|| (r.name().to_string(), n))
                        })
                        .collect(),
                })
                .collect(),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| {
                    (
                        o.name().to_string(),
                        self.outcomes.get(o.index()).map_or(0, get),
                    )
                })
                .collect(),
            conntrack: CONNTRACK_COUNTERS
                .iter()
                .zip(&self.conntrack)
                .map(|(n, c)| {
                    let v = if *n == "entries" {
                        self.workers.iter().map(|w| get(&w.ct_entries)).sum()
                    } else {
                        get(c)
                    };
                    (n.to_string(), v)
                })
                .collect(),
            workers: self
                .workers
                .iter()
                .map(|w| {
                    let mut m: std::collections::BTreeMap<String, u64> = WORKER_COUNTERS
                        .iter()
                        .zip(&w.counts)
                        .map(|(n, c)| (n.to_string(), get(c)))
                        .collect();
                    m.insert("conntrack_entries".into(), get(&w.ct_entries));
                    m
                })
                .collect(),
            flow_cache: FLOW_CACHE_COUNTERS
                .iter()
                .zip(&self.flow_cache)
                .map(|(n, c)| (n.to_string(), get(c)))
                .collect(),
        }
    }
}

/// Counters of one interface, as reported.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PortSnapshot {
    pub interface: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Drop reason → count (non-zero only).
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// All counters, as reported.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub ports: Vec<PortSnapshot>,
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Connection tracking, summed over workers.
    #[serde(default)]
    pub conntrack: std::collections::BTreeMap<String, u64>,
    /// Flow cache (hits, misses, evictions, invalidations), summed over workers.
    #[serde(default)]
    pub flow_cache: std::collections::BTreeMap<String, u64>,
    /// Per worker: [`WORKER_COUNTERS`] and `conntrack_entries`.
    #[serde(default)]
    pub workers: Vec<std::collections::BTreeMap<String, u64>>,
}

impl StatsSnapshot {
    /// Counters of one interface.
    pub fn port(&self, interface: &str) -> Option<&PortSnapshot> {
        self.ports.iter().find(|p| p.interface == interface)
    }
}
