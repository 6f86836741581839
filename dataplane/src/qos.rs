//! QoS: per-port token-bucket policers (ingress and egress, rate + burst,
//! over-rate frames dropped) and DSCP marking of the traffic a port sends.
//!
//! # Design
//!
//! - The meters' configuration is compiled into the immutable tables
//!   ([`QosTables`]): a meter index per (logical port, direction) and the
//!   DSCP to write. The buckets themselves are mutable, so they live in the
//!   worker ([`QosState`]), one set per worker, and are touched without locks
//!   or atomics. With several workers each worker polices the flows steered
//!   to it at the full rate, so a port whose flows spread over N workers
//!   may get up to N × its rate (a shared token pool would fix that).
//! - Tokens are kept in "nano-bytes" (bytes × 10⁹): a refill is
//!   `elapsed_ns × rate_bytes_per_s` with no division and no rounding loss,
//!   so the long-run rate is exact. The clock is read once per batch
//!   ([`QosState::tick`]).
//! - A configuration change keeps a meter's bucket (its tokens) when the
//!   meter, identified by port name and direction, keeps its rate and burst;
//!   a changed or new meter starts full. The apply links each meter to its
//!   predecessor ([`QosTables::link`], on the control thread); the worker
//!   moves the buckets when it first sees the new generation, in O(meters),
//!   into a second pre-allocated vector: nothing is allocated after start-up.
//! - Counters (conformed / dropped frames and bytes per meter) are counted
//!   in the bucket and folded into the tables' atomics once per polling round
//!   ([`QosState::fold`]); like the rule hit counters they restart with each
//!   apply. `{"op":"qos_stats"}` reads them.
//!
//! Direction is the VM's: `egress` meters what the port sends (before the
//! router), `ingress` what is delivered to it (unicast; flooded frames are
//! not metered). DSCP marking rewrites the DS field of IPv4 (header checksum
//! updated, RFC 1624) and IPv6 packets sent by the port; ECN bits are kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::packet::checksum::update16;
use crate::packet::parse::L3;
use crate::packet::Parsed;
use crate::tables::LportId;

/// Most meters a data plane holds (buckets are pre-allocated at this size).
pub const MAX_METERS: usize = 4096;
/// The smallest burst: one maximum-size frame (1500-byte MTU, Ethernet
/// header and one VLAN tag). A smaller bucket could never pass such a frame.
pub const MIN_BURST_BYTES: u64 = 1518;
/// The largest rate accepted (keeps the token arithmetic in `u64`).
pub const MAX_RATE_KBPS: u64 = 400_000_000;
/// The largest burst accepted, for the same reason.
pub const MAX_BURST_BYTES: u64 = 1 << 30;
const NANOS: u64 = 1_000_000_000;

/// A token-bucket meter: sustained rate and burst size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterSpec {
    /// Sustained rate in kilobits (1000 bits) per second of Ethernet frames.
    pub rate_kbps: u64,
    /// Bucket size in bytes: how much may pass at line rate after idling.
    pub burst_bytes: u64,
}

/// QoS of one logical port, or of one floating IP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosSpec {
    /// A logical port; or
    #[serde(default)]
    pub port: Option<String>,
    /// a floating IP (the external IP of a `dnat_and_snat` rule): `ingress`
    /// meters what the router forwards to it, `egress` what leaves from it.
    #[serde(default)]
    pub floating_ip: Option<String>,
    /// Limit on what the port (floating IP) receives.
    #[serde(default)]
    pub ingress: Option<MeterSpec>,
    /// Limit on what the port (floating IP) sends.
    #[serde(default)]
    pub egress: Option<MeterSpec>,
    /// DSCP (0..=63) written into IP packets the port sends (ports only).
    #[serde(default)]
    pub dscp: Option<u8>,
}

/// Why a QoS configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    #[error("QoS: unknown port {port:?}")]
    UnknownPort { port: String },
    #[error("QoS entry {index}: give exactly one of port and floating_ip")]
    PortOrFloatingIp { index: usize },
    #[error(
        "QoS: {value:?} is not the external IPv4 address of a dnat_and_snat (floating IP) rule"
    )]
    NotAFloatingIp { value: String },
    #[error("QoS of floating IP {ip}: DSCP marking is per port")]
    DscpOnFloatingIp { ip: String },
    #[error("QoS: port {port:?} is configured twice")]
    DuplicatePort { port: String },
    #[error("QoS of port {port:?}: {direction} rate is zero")]
    ZeroRate {
        port: String,
        direction: &'static str,
    },
    #[error("QoS of port {port:?}: {direction} rate {rate_kbps} kbit/s exceeds {MAX_RATE_KBPS}")]
    RateTooHigh {
        port: String,
        direction: &'static str,
        rate_kbps: u64,
    },
    #[error("QoS of port {port:?}: {direction} burst {burst_bytes} bytes is smaller than one maximum-size frame ({MIN_BURST_BYTES} bytes)")]
    BurstBelowMtu {
        port: String,
        direction: &'static str,
        burst_bytes: u64,
    },
    #[error(
        "QoS of port {port:?}: {direction} burst {burst_bytes} bytes exceeds {MAX_BURST_BYTES}"
    )]
    BurstTooLarge {
        port: String,
        direction: &'static str,
        burst_bytes: u64,
    },
    #[error("QoS of port {port:?}: DSCP {dscp} outside 0..=63")]
    BadDscp { port: String, dscp: u8 },
    #[error("QoS: port {port:?} has no settings")]
    Empty { port: String },
    #[error("QoS: more than {MAX_METERS} meters")]
    TooManyMeters,
}

/// A compiled meter.
#[derive(Debug)]
pub struct Meter {
    /// `port/direction`, for stats and traces.
    pub name: String,
    /// Stable identity across applies (hash of the name).
    pub identity: u64,
    pub rate_bytes_per_s: u64,
    pub burst_bytes: u64,
    pub spec: MeterSpec,
    pub counters: MeterCounters,
    /// The same meter (same identity, rate and burst) in the previous
    /// generation ([`QosTables::link`]): its bucket is kept.
    pub prev: Option<u16>,
}

/// Shared counters of one meter (folded from the workers once per round).
#[derive(Debug, Default)]
pub struct MeterCounters {
    pub conformed_packets: AtomicU64,
    pub conformed_bytes: AtomicU64,
    pub dropped_packets: AtomicU64,
    pub dropped_bytes: AtomicU64,
}

/// QoS of one compiled port.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortQos {
    pub ingress: Option<u16>,
    pub egress: Option<u16>,
    pub dscp: Option<u8>,
}

/// The compiled QoS configuration, part of [`crate::tables::Tables`].
#[derive(Debug, Default)]
pub struct QosTables {
    /// Per logical port (indexed like `Tables::lports`); empty when no QoS is configured.
    pub ports: Vec<PortQos>,
    /// Per floating IP (IPv4 as `u32`); empty when none has meters.
    pub floating: crate::fastmap::FastMap<u32, PortQos>,
    pub meters: Vec<Meter>,
    /// The generation [`Meter::prev`] refers to.
    pub prev_generation: u64,
}

impl Clone for QosTables {
    fn clone(&self) -> Self {
        QosTables {
            ports: self.ports.clone(),
            floating: self.floating.clone(),
            meters: self
                .meters
                .iter()
                .map(|m| Meter {
                    name: m.name.clone(),
                    identity: m.identity,
                    rate_bytes_per_s: m.rate_bytes_per_s,
                    burst_bytes: m.burst_bytes,
                    spec: m.spec,
                    counters: MeterCounters::default(),
                    prev: m.prev,
                })
                .collect(),
            prev_generation: self.prev_generation,
        }
    }
}

fn identity(name: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = crate::fastmap::FastHasher::default();
    h.write(name.as_bytes());
    h.finish()
}

fn check_meter(port: &str, direction: &'static str, m: &MeterSpec) -> Result<(), QosError> {
    let port = || port.to_string();
    if m.rate_kbps == 0 {
        return Err(QosError::ZeroRate {
            port: port(),
            direction,
        });
    }
    if m.rate_kbps > MAX_RATE_KBPS {
        return Err(QosError::RateTooHigh {
            port: port(),
            direction,
            rate_kbps: m.rate_kbps,
        });
    }
    if m.burst_bytes < MIN_BURST_BYTES {
        return Err(QosError::BurstBelowMtu {
            port: port(),
            direction,
            burst_bytes: m.burst_bytes,
        });
    }
    if m.burst_bytes > MAX_BURST_BYTES {
        return Err(QosError::BurstTooLarge {
            port: port(),
            direction,
            burst_bytes: m.burst_bytes,
        });
    }
    Ok(())
}

/// Validates the QoS specs against the compiled ports and the floating IPs
/// (external IPs of `dnat_and_snat` rules) and compiles them.
pub fn compile(
    specs: &[QosSpec],
    lport_names: &[&str],
    floating_ips: &[&str],
) -> Result<QosTables, QosError> {
    if specs.is_empty() {
        return Ok(QosTables::default());
    }
    let mut ports = vec![PortQos::default(); lport_names.len()];
    let mut floating = crate::fastmap::with_capacity(0);
    let mut seen = std::collections::HashSet::new();
    let mut meters = Vec::new();
    for (index, s) in specs.iter().enumerate() {
        let owner = match (&s.port, &s.floating_ip) {
            (Some(p), None) => p.clone(),
            (None, Some(ip)) => ip.clone(),
            _ => return Err(QosError::PortOrFloatingIp { index }),
        };
        if !seen.insert(owner.clone()) {
            return Err(QosError::DuplicatePort { port: owner });
        }
        if s.ingress.is_none() && s.egress.is_none() && s.dscp.is_none() {
            return Err(QosError::Empty { port: owner });
        }
        if let Some(d) = s.dscp.filter(|d| *d > 63) {
            return Err(QosError::BadDscp {
                port: owner,
                dscp: d,
            });
        }
        let mut meter = |direction: &'static str, m: &Option<MeterSpec>| {
            let Some(m) = m else { return Ok(None) };
            check_meter(&owner, direction, m)?;
            let idx = u16::try_from(meters.len())
                .ok()
                .filter(|i| usize::from(*i) < MAX_METERS)
                .ok_or(QosError::TooManyMeters)?;
            let name = format!("{owner}/{direction}");
            meters.push(Meter {
                identity: identity(&name),
                name,
                rate_bytes_per_s: m.rate_kbps * 1000 / 8,
                burst_bytes: m.burst_bytes,
                spec: *m,
                counters: MeterCounters::default(),
                prev: None,
            });
            Ok(Some(idx))
        };
        let q = PortQos {
            ingress: meter("ingress", &s.ingress)?,
            egress: meter("egress", &s.egress)?,
            dscp: s.dscp,
        };
        match (&s.port, &s.floating_ip) {
            (Some(port), _) => {
                let id = lport_names
                    .iter()
                    .position(|n| n == port)
                    .ok_or_else(|| QosError::UnknownPort { port: port.clone() })?;
                if let Some(p) = ports.get_mut(id) {
                    *p = q;
                }
            }
            (None, Some(ip)) => {
                let v4: std::net::Ipv4Addr = ip
                    .parse()
                    .ok()
                    .filter(|_| floating_ips.contains(&ip.as_str()))
                    .ok_or_else(|| QosError::NotAFloatingIp { value: ip.clone() })?;
                if q.dscp.is_some() {
                    return Err(QosError::DscpOnFloatingIp { ip: ip.clone() });
                }
                floating.insert(u32::from(v4), q);
            }
            (None, None) => return Err(QosError::PortOrFloatingIp { index }),
        }
    }
    Ok(QosTables {
        ports,
        floating,
        meters,
        prev_generation: 0,
    })
}

/// One meter's bucket and local counts, owned by a worker.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    identity: u64,
    rate: u64,
    /// Capacity in nano-bytes.
    cap: u64,
    /// Tokens in nano-bytes.
    tokens: u64,
    last_ns: u64,
    conformed_packets: u64,
    conformed_bytes: u64,
    dropped_packets: u64,
    dropped_bytes: u64,
    /// Listed in `QosState::dirty` (has counts to fold).
    dirty: bool,
}

impl Bucket {
    fn fresh(m: &Meter, now: u64) -> Bucket {
        let cap = m.burst_bytes.saturating_mul(NANOS);
        Bucket {
            identity: m.identity,
            rate: m.rate_bytes_per_s,
            cap,
            tokens: cap,
            last_ns: now,
            ..Bucket::default()
        }
    }

    // hot path: integer arithmetic only.
    fn conform(&mut self, now: u64, bytes: u64) -> bool {
        let elapsed = now.saturating_sub(self.last_ns);
        self.last_ns = now;
        self.tokens = self
            .tokens
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.cap);
        let cost = bytes.saturating_mul(NANOS);
        if self.tokens >= cost {
            self.tokens -= cost;
            self.conformed_packets += 1;
            self.conformed_bytes += bytes;
            true
        } else {
            self.dropped_packets += 1;
            self.dropped_bytes += bytes;
            false
        }
    }
}

/// A worker's meter buckets.
pub struct QosState {
    generation: u64,
    start: Instant,
    now_ns: u64,
    buckets: Vec<Bucket>,
    spare: Vec<Bucket>,
    /// Buckets counted in since the last fold.
    dirty: Vec<u16>,
}

impl Default for QosState {
    fn default() -> Self {
        QosState::new()
    }
}

impl QosState {
    /// Buckets for up to [`MAX_METERS`] meters, allocated now.
    pub fn new() -> QosState {
        QosState {
            generation: u64::MAX,
            start: Instant::now(),
            now_ns: 0,
            buckets: Vec::with_capacity(MAX_METERS),
            spare: Vec::with_capacity(MAX_METERS),
            dirty: Vec::with_capacity(MAX_METERS),
        }
    }

    /// Reads the clock; once per batch.
    pub fn tick(&mut self) {
        self.now_ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    }

    /// Sets the clock (tests and benchmarks).
    pub fn set_now_ns(&mut self, now: u64) {
        self.now_ns = now;
    }

    /// Follows a new generation of the tables: keeps the buckets of meters
    /// whose rate and burst are unchanged. One compare when nothing changed.
    pub fn sync(&mut self, generation: u64, t: &QosTables) {
        if self.generation == generation {
            return;
        }
        self.spare.clear();
        self.dirty.clear();
        // Linked at apply: O(1) per meter. A worker that skipped a
        // generation (two applies within one batch) searches instead.
        let linked = self.generation == t.prev_generation;
        for (i, m) in t.meters.iter().take(MAX_METERS).enumerate() {
            let cap = m.burst_bytes.saturating_mul(NANOS);
            let same = |b: &&Bucket| {
                b.identity == m.identity && b.rate == m.rate_bytes_per_s && b.cap == cap
            };
            let kept = if linked {
                m.prev
                    .and_then(|p| self.buckets.get(usize::from(p)))
                    .filter(same)
            } else {
                // Usually the meter kept its position; else search.
                self.buckets
                    .get(i)
                    .filter(same)
                    .or_else(|| self.buckets.iter().find(same))
            };
            let b = match kept {
                Some(old) => Bucket {
                    conformed_packets: 0,
                    conformed_bytes: 0,
                    dropped_packets: 0,
                    dropped_bytes: 0,
                    dirty: false,
                    ..*old
                },
                None => Bucket::fresh(m, self.now_ns),
            };
            self.spare.push(b);
        }
        std::mem::swap(&mut self.buckets, &mut self.spare);
        self.generation = generation;
    }

    /// Whether a `bytes`-long frame conforms to `meter`; counts either way.
    // hot path: an index and integer arithmetic.
    pub fn police(&mut self, meter: u16, bytes: usize) -> bool {
        let now = self.now_ns;
        match self.buckets.get_mut(usize::from(meter)) {
            Some(b) => {
                if !b.dirty {
                    b.dirty = true;
                    self.dirty.push(meter);
                }
                b.conform(now, bytes as u64)
            }
            // The worker has not synced to these tables (a trace): pass.
            None => true,
        }
    }

    /// Adds and zeroes the local counts into the tables' counters (once per round).
    pub fn fold(&mut self, t: &QosTables) {
        for i in self.dirty.drain(..) {
            let (Some(b), Some(m)) = (
                self.buckets.get_mut(usize::from(i)),
                t.meters.get(usize::from(i)),
            ) else {
                continue;
            };
            b.dirty = false;
            let c = &m.counters;
            for (shared, local) in [
                (&c.conformed_packets, &mut b.conformed_packets),
                (&c.conformed_bytes, &mut b.conformed_bytes),
                (&c.dropped_packets, &mut b.dropped_packets),
                (&c.dropped_bytes, &mut b.dropped_bytes),
            ] {
                if *local != 0 {
                    shared.fetch_add(*local, Ordering::Relaxed);
                    *local = 0;
                }
            }
        }
    }
}

/// Counters of one meter, as reported by `{"op":"qos_stats"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterStats {
    pub meter: String,
    pub rate_kbps: u64,
    pub burst_bytes: u64,
    pub conformed_packets: u64,
    pub conformed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

impl QosTables {
    /// Links each meter to the same meter of the running generation (on the
    /// control thread, at apply), so a worker keeps buckets in O(meters).
    pub fn link(&mut self, prev: &QosTables, prev_generation: u64) {
        let by_identity: std::collections::HashMap<u64, (usize, &Meter)> = prev
            .meters
            .iter()
            .enumerate()
            .map(|(i, m)| (m.identity, (i, m)))
            .collect();
        for m in &mut self.meters {
            m.prev = by_identity
                .get(&m.identity)
                .filter(|(_, o)| {
                    o.rate_bytes_per_s == m.rate_bytes_per_s && o.burst_bytes == m.burst_bytes
                })
                .and_then(|(i, _)| u16::try_from(*i).ok());
        }
        self.prev_generation = prev_generation;
    }

    /// A snapshot of every meter's counters.
    pub fn stats(&self) -> Vec<MeterStats> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.meters
            .iter()
            .map(|m| MeterStats {
                meter: m.name.clone(),
                rate_kbps: m.spec.rate_kbps,
                burst_bytes: m.spec.burst_bytes,
                conformed_packets: get(&m.counters.conformed_packets),
                conformed_bytes: get(&m.counters.conformed_bytes),
                dropped_packets: get(&m.counters.dropped_packets),
                dropped_bytes: get(&m.counters.dropped_bytes),
            })
            .collect()
    }

    /// QoS of a logical port, if any.
    // hot path: one bounds-checked index.
    pub fn port(&self, lport: LportId) -> Option<&PortQos> {
        self.ports.get(lport as usize)
    }
}

/// Writes `dscp` into the IP header of the parsed frame in `buf` (keeping
/// ECN); IPv4's header checksum is updated incrementally. `false` when the
/// frame is not IP (left unchanged).
// hot path: a few byte writes.
pub fn mark_dscp(buf: &mut [u8], p: &Parsed, dscp: u8) -> bool {
    let o = p.l3_offset;
    match p.l3 {
        L3::Ipv4(_) => {
            let (Some(&vihl), Some(&tos)) = (buf.get(o), buf.get(o + 1)) else {
                return false;
            };
            let new_tos = (dscp << 2) | (tos & 0x03);
            if new_tos == tos {
                return true;
            }
            let (Some(&c0), Some(&c1)) = (buf.get(o + 10), buf.get(o + 11)) else {
                return false;
            };
            let csum = update16(
                u16::from_be_bytes([c0, c1]),
                u16::from_be_bytes([vihl, tos]),
                u16::from_be_bytes([vihl, new_tos]),
            );
            if let Some(h) = buf.get_mut(o..o + 12) {
                h[1] = new_tos;
                h[10..12].copy_from_slice(&csum.to_be_bytes());
                return true;
            }
            false
        }
        L3::Ipv6(_) => {
            // Traffic class = low nibble of byte 0 and high nibble of byte 1.
            let Some(h) = buf.get_mut(o..o + 2) else {
                return false;
            };
            let tc = ((h[0] & 0x0f) << 4) | (h[1] >> 4);
            let tc = (dscp << 2) | (tc & 0x03);
            h[0] = (h[0] & 0xf0) | (tc >> 4);
            h[1] = (h[1] & 0x0f) | ((tc & 0x0f) << 4);
            true
        }
        _ => false,
    }
}
