//! The logical pipeline, run to completion per packet:
//! `parse → ingress → port_security → learn → arp_responder → (router | l2_forward)`.
//!
//! [`process`] is generic over a [`Tracer`]: the forwarding instance uses
//! [`NoTrace`], whose methods are empty and inline away (VPP's `do_trace = 0`
//! node instance), and the trace facility uses [`RecordTrace`], which writes a
//! step per stage. Both run the same code, so a trace shows exactly what
//! forwarding does.
//!
//! Packets are rewritten in place: ARP replies and ICMP errors reuse the
//! request's buffer, which is why `process` takes the whole buffer and the
//! frame length separately.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::counters::{DropReason, Outcome};
use crate::fastmap::{self, mac_key, FastMap};
use crate::packet::checksum::{self, internet_checksum, update16};
use crate::packet::headers::{
    is_group, mac_to_string, Mac, ARP_REPLY, ARP_REQUEST, ETHERTYPE_VLAN, ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED, IPPROTO_ICMP,
};
use crate::packet::parse::{Ipv4Info, L3, L4};
use crate::packet::{parse, Parsed};
use crate::tables::{ingress_key, Gateway, Ingress, LportId, SwitchId, Tables};

/// Where a processed frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop(DropReason),
    /// Out of one interface.
    Unicast {
        port: u16,
    },
    /// To every member of the switch except the ingress logical port (and
    /// never back out the ingress interface).
    Flood {
        switch: SwitchId,
        except: LportId,
    },
    /// Back out the ingress interface (ARP replies, ICMP errors, echo replies).
    Reply,
    /// Taken by the data plane itself (an ARP reply to a router).
    Consumed,
    /// Encapsulated with `vni` to overlay endpoint `endpoint`, out the
    /// underlay interface; `entropy` (a flow hash) picks the UDP source port.
    Tunnel {
        endpoint: u16,
        vni: u32,
        entropy: u16,
    },
}

/// Receives per-stage decisions; [`NoTrace`] on the forwarding path.
pub trait Tracer {
    /// Records that `stage` decided what `decision` describes.
    fn note(&mut self, stage: &'static str, decision: impl FnOnce() -> String);
}

/// The forwarding path's tracer: records nothing, costs nothing.
pub struct NoTrace;

impl Tracer for NoTrace {
    #[inline(always)]
    fn note(&mut self, _stage: &'static str, _decision: impl FnOnce() -> String) {}
}

/// One stage's decision in a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStep {
    pub stage: String,
    pub decision: String,
}

/// Collects every stage's decision.
#[derive(Debug, Default)]
pub struct RecordTrace {
    pub steps: Vec<TraceStep>,
}

impl Tracer for RecordTrace {
    fn note(&mut self, stage: &'static str, decision: impl FnOnce() -> String) {
        self.steps.push(TraceStep {
            stage: stage.to_string(),
            decision: decision(),
        });
    }
}

/// Learned MACs a worker passes to the others per round at most (more are
/// learned by each worker on its own, after a flood).
pub const JOURNAL: usize = 64;
/// Neighbors (IP → MAC of hosts without a binding, e.g. behind an uplink)
/// a worker's routers hold at most.
pub const NEIGHBORS: usize = 4096;
/// A neighbor not confirmed by its own ARP for this long (s) is probed
/// (Linux's base reachable time).
pub const NEIGHBOR_REACHABLE_S: u32 = 30;
/// ... and forgotten when still unconfirmed this long after it was last
/// confirmed (about 15 unanswered probes, one a second): the next packet
/// towards it asks by broadcast again.
pub const NEIGHBOR_EXPIRE_S: u32 = 45;
/// Neighbor probes queued per second per worker; the rest wait a second.
const PROBES_PER_SECOND: usize = 64;

/// A router's neighbor: its MAC and when its own ARP last confirmed it.
#[derive(Debug, Clone, Copy)]
struct Neighbor {
    mac: Mac,
    confirmed: u32,
}

/// MACs learned on ports without bindings; owned by one worker.
///
/// Bounded: allocated once with its capacity and never grown, so learning
/// does not allocate on the hot path. Cleared when the tables' generation
/// changes (a port may have moved or disappeared).
pub struct Learned {
    generation: u64,
    /// Moves whenever the MAC table changes (the flow cache's invalidation).
    version: u64,
    capacity: usize,
    map: FastMap<u64, LportId>,
    /// MACs learned here since the engine last shared them with the other
    /// workers ([`crate::handoff`]); bounded, allocated once.
    journal: Vec<crate::handoff::Learn>,
    /// Connection tracking for the stateful stages ([`crate::stateful`]).
    pub stateful: crate::stateful::WorkerState,
    /// Meter buckets ([`crate::qos`]).
    pub qos: crate::qos::QosState,
    /// Router policy hit counts ([`crate::policy`]).
    pub policy: crate::policy::PolicyState,
    /// Neighbors learned from ARP on switches with a router leg: hosts
    /// with no binding (an uplink's far side). Bounded, allocated once;
    /// aged once a second ([`NEIGHBOR_REACHABLE_S`], [`NEIGHBOR_EXPIRE_S`]).
    neighbors: FastMap<u64, Neighbor>,
    /// Neighbors to probe now (keys), filled by the aging pass.
    probe: Vec<u64>,
    /// The clock second the neighbors were last aged.
    aged_at: u32,
    /// When (conntrack clock, s) a router last asked for an unresolved
    /// neighbor: at most one ARP request per neighbor per second.
    asked: FastMap<u64, u32>,
    /// Frames decapsulated since the engine last took the count.
    pub decapped: u64,
    /// The frame being processed came out of a tunnel.
    from_tunnel: bool,
}

impl Learned {
    /// A table for up to `capacity` MACs (0 disables learning, as traces do).
    pub fn new(capacity: usize) -> Learned {
        Learned {
            generation: 0,
            version: 0,
            capacity,
            map: fastmap::with_capacity(capacity),
            journal: Vec::with_capacity(JOURNAL),
            stateful: crate::stateful::WorkerState::new(crate::stateful::DEFAULT_CONNECTIONS),
            qos: crate::qos::QosState::new(),
            policy: crate::policy::PolicyState::default(),
            neighbors: fastmap::with_capacity(NEIGHBORS),
            probe: Vec::with_capacity(PROBES_PER_SECOND),
            aged_at: 0,
            asked: fastmap::with_capacity(NEIGHBORS),
            decapped: 0,
            from_tunnel: false,
        }
    }

    /// Replaces the connection table with one of `connections` entries.
    pub fn with_connections(mut self, connections: usize) -> Learned {
        self.stateful = crate::stateful::WorkerState::new(connections);
        self
    }

    fn key(switch: SwitchId, mac: &Mac) -> u64 {
        (u64::from(switch) << 48) | mac_key(mac)
    }

    /// Drops everything learned under an older configuration.
    // hot path: one compare per batch.
    pub fn sync(&mut self, generation: u64) {
        self.stateful.tick();
        self.qos.tick();
        if self.generation != generation {
            self.map.clear();
            self.journal.clear();
            self.neighbors.clear();
            self.probe.clear();
            self.asked.clear();
            self.generation = generation;
            self.version += 1;
        }
        let now = self.stateful.ct.now();
        if now != self.aged_at {
            self.aged_at = now;
            self.age_neighbors(now);
        }
    }

    /// Once a second: forgets the neighbors unconfirmed for
    /// [`NEIGHBOR_EXPIRE_S`] (cached flows towards them go with the version)
    /// and queues probes for those unconfirmed for [`NEIGHBOR_REACHABLE_S`].
    pub(crate) fn age_neighbors(&mut self, now: u32) {
        let Learned {
            neighbors, probe, ..
        } = self;
        probe.clear();
        let before = neighbors.len();
        neighbors.retain(|key, n| {
            let age = now.saturating_sub(n.confirmed);
            if (NEIGHBOR_REACHABLE_S..NEIGHBOR_EXPIRE_S).contains(&age)
                && probe.len() < PROBES_PER_SECOND
            {
                probe.push(*key);
            }
            age < NEIGHBOR_EXPIRE_S
        });
        if neighbors.len() != before {
            self.version += 1;
        }
    }

    /// Queues a probe of `ip` on `switch` as the aging pass would.
    #[cfg(test)]
    pub(crate) fn queue_neighbor_probe(&mut self, switch: SwitchId, ip: Ipv4Addr) {
        self.probe.push(Self::neighbor_key(switch, ip));
    }

    /// The next neighbor to probe (switch, address), from this second's
    /// aging pass.
    pub fn next_neighbor_probe(&mut self) -> Option<(SwitchId, Ipv4Addr)> {
        let key = self.probe.pop()?;
        let switch = SwitchId::try_from(key >> 32).ok()?;
        let ip = u32::try_from(key & 0xffff_ffff).ok()?;
        Some((switch, Ipv4Addr::from(ip)))
    }

    /// Records `mac` behind `lport`; `true` when the entry is new or moved.
    pub fn learn(&mut self, switch: SwitchId, mac: &Mac, lport: LportId) -> bool {
        let key = Self::key(switch, mac);
        let changed = self.learn_key(key, lport);
        if changed && self.journal.len() < JOURNAL {
            self.journal.push(crate::handoff::Learn::Mac { key, lport });
        }
        changed
    }

    /// MACs and neighbors learned since the last call, for the other
    /// workers (with the generation they were learned under).
    pub fn take_journal(&mut self) -> (u64, std::vec::Drain<'_, crate::handoff::Learn>) {
        (self.generation, self.journal.drain(..))
    }

    /// Applies what another worker learned under `generation` (ignored when
    /// this worker's tables moved on); not journaled again.
    pub fn learn_shared(&mut self, generation: u64, learn: crate::handoff::Learn) {
        if generation != self.generation {
            return;
        }
        match learn {
            crate::handoff::Learn::Mac { key, lport } => {
                self.learn_key(key, lport);
            }
            crate::handoff::Learn::Neighbor {
                key,
                mac,
                confirmed,
            } => {
                self.set_neighbor(key, mac, confirmed);
            }
        }
    }

    fn learn_key(&mut self, key: u64, lport: LportId) -> bool {
        let room = self.map.len() < self.capacity;
        match self.map.get_mut(&key) {
            Some(existing) if *existing == lport => false,
            Some(existing) => {
                *existing = lport;
                self.version += 1;
                true
            }
            None if room => {
                self.map.insert(key, lport);
                self.version += 1;
                true
            }
            None => false,
        }
    }

    fn neighbor_key(switch: SwitchId, ip: Ipv4Addr) -> u64 {
        (u64::from(switch) << 32) | u64::from(u32::from(ip))
    }

    /// Records that `ip` on `switch` is at `mac`, confirmed now by its own
    /// ARP (shared with the other workers); `true` when new or moved.
    pub fn learn_neighbor(&mut self, switch: SwitchId, ip: Ipv4Addr, mac: Mac) -> bool {
        let key = Self::neighbor_key(switch, ip);
        let confirmed = self.stateful.ct.now();
        let changed = self.set_neighbor(key, mac, confirmed);
        if self.journal.len() < JOURNAL {
            self.journal.push(crate::handoff::Learn::Neighbor {
                key,
                mac,
                confirmed,
            });
        }
        changed
    }

    fn set_neighbor(&mut self, key: u64, mac: Mac, confirmed: u32) -> bool {
        let room = self.neighbors.len() < NEIGHBORS;
        let changed = match self.neighbors.get_mut(&key) {
            Some(known) if known.mac == mac => {
                known.confirmed = known.confirmed.max(confirmed);
                false
            }
            Some(known) => {
                *known = Neighbor { mac, confirmed };
                true
            }
            None if room => {
                self.neighbors.insert(key, Neighbor { mac, confirmed });
                true
            }
            None => false,
        };
        if changed {
            self.asked.remove(&key);
            // Cached "no neighbor" drops must go.
            self.version += 1;
        }
        changed
    }

    /// The MAC learned for `ip` on `switch`.
    pub fn neighbor(&self, switch: SwitchId, ip: Ipv4Addr) -> Option<Mac> {
        self.neighbors
            .get(&Self::neighbor_key(switch, ip))
            .map(|n| n.mac)
    }

    /// Whether to send an ARP request for `ip` on `switch` now (not within
    /// the last second, and room to remember asking).
    fn should_ask(&mut self, switch: SwitchId, ip: Ipv4Addr) -> bool {
        let key = Self::neighbor_key(switch, ip);
        let now = self.stateful.ct.now();
        let room = self.asked.len() < NEIGHBORS;
        match self.asked.get_mut(&key) {
            Some(at) if *at == now => false,
            Some(at) => {
                *at = now;
                true
            }
            None if room => {
                self.asked.insert(key, now);
                true
            }
            None => false,
        }
    }

    /// Changes whenever a MAC is learned, moved or flushed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The port behind a learned MAC.
    pub fn lookup(&self, switch: SwitchId, mac: &Mac) -> Option<LportId> {
        self.map.get(&Self::key(switch, mac)).copied()
    }

    /// Number of learned MACs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is learned.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The result of [`process`]: a verdict plus the outcome to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub outcome: Option<Outcome>,
    /// Set when a MAC was learned on the way.
    pub learned: bool,
}

fn drop_(reason: DropReason) -> Decision {
    Decision {
        verdict: Verdict::Drop(reason),
        outcome: None,
        learned: false,
    }
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) -> bool {
    match off
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(off..end))
    {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn get16(buf: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *buf.get(off)?,
        *buf.get(off.checked_add(1)?)?,
    ]))
}

/// Runs the pipeline on `buf[..*len]` arriving on interface `in_port`.
/// May rewrite the frame and `*len` (never beyond `buf.len()`).
// hot path: no allocation, no lock, no syscall; the Tracer is monomorphised away.
pub fn process<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    in_port: u16,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Decision {
    learned.from_tunnel = false;
    let d = process_frame(t, learned, in_port, buf, len, tr);
    loop_check(learned, d, tr)
}

/// Loop prevention: what came out of a tunnel goes to local ports only.
fn loop_check<T: Tracer>(learned: &Learned, d: Decision, tr: &mut T) -> Decision {
    if learned.from_tunnel && matches!(d.verdict, Verdict::Tunnel { .. } | Verdict::Reply) {
        tr.note("overlay_decap", || {
            "drop: would go back into the tunnel (delivered to local ports only)".into()
        });
        return drop_(DropReason::OverlayLoop);
    }
    d
}

/// The first half of [`process`] for a frame on the underlay interface:
/// validates the tunnel header and strips it in place (the inner frame is
/// then `buf[..*len]`); returns the VNI's tunnel port, or the frame's
/// decision (a counted drop, an ARP reply for the local endpoint). The
/// engine runs the second half, [`process_from_tunnel`], behind its flow
/// cache, keyed on the inner frame.
// hot path: one outer parse, one 20-byte checksum, one move of the inner frame.
pub fn strip_tunnel<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Result<LportId, Decision> {
    let Some(o) = t.overlay.as_ref() else {
        return Err(drop_(DropReason::UnknownIngress));
    };
    let p = match buf.get(..*len).map(parse) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            tr.note("parse", || format!("drop: {e}"));
            return Err(drop_(DropReason::from(e)));
        }
        None => return Err(drop_(DropReason::Oversize)),
    };
    tr.note("parse", || describe(&p));
    decap(t, o, learned, &p, buf, len, tr)
}

/// The second half: the inner frame from tunnel port `lport` through the
/// pipeline (local ports only).
pub fn process_from_tunnel<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    lport: LportId,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Decision {
    learned.qos.sync(t.generation, &t.qos);
    learned.from_tunnel = true;
    let d = from_tunnel_port(t, learned, lport, buf, len, tr);
    loop_check(learned, d, tr)
}

/// Parses the (decapsulated) frame and runs it from tunnel port `lport`.
fn from_tunnel_port<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    lport: LportId,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Decision {
    let p = match buf.get(..*len).map(parse) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            tr.note("parse", || format!("drop: inner frame: {e}"));
            return drop_(DropReason::from(e));
        }
        None => return drop_(DropReason::OverlayMalformed),
    };
    tr.note("parse", || describe(&p));
    forward_from(
        t,
        learned,
        lport,
        &p,
        buf,
        len,
        tr,
        DropReason::OverlayUnknownVni,
    )
}

/// Runs a parsed frame from logical port `lport` (its switch looked up);
/// `unknown` is the drop when the port or its switch does not exist.
#[allow(clippy::too_many_arguments)]
fn forward_from<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    lport: LportId,
    p: &Parsed,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
    unknown: DropReason,
) -> Decision {
    let Some((lp, sw)) = t
        .lports
        .get(lport as usize)
        .and_then(|lp| Some((lp, t.switches.get(lp.switch as usize)?)))
    else {
        return drop_(unknown);
    };
    tr.note("ingress", || {
        format!("logical port {:?} on switch {:?}", lp.name, sw.name)
    });
    forward(t, learned, lport, lp, sw, p, buf, len, tr)
}

fn process_frame<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    in_port: u16,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Decision {
    learned.qos.sync(t.generation, &t.qos);
    let Some(frame) = buf.get(..*len) else {
        return drop_(DropReason::Oversize);
    };
    let p = match parse(frame) {
        Ok(p) => p,
        Err(e) => {
            tr.note("parse", || format!("drop: {e}"));
            return drop_(DropReason::from(e));
        }
    };
    tr.note("parse", || describe(&p));

    let lport_id = match t.overlay.as_ref().filter(|o| o.port == in_port) {
        Some(o) => {
            return match decap(t, o, learned, &p, buf, len, tr) {
                Ok(lport) => from_tunnel_port(t, learned, lport, buf, len, tr),
                Err(d) => d,
            }
        }
        None => match ingress(t, in_port, &p, tr) {
            Ok(id) => id,
            Err(d) => return d,
        },
    };
    forward_from(
        t,
        learned,
        lport_id,
        &p,
        buf,
        len,
        tr,
        DropReason::UnknownIngress,
    )
}

/// Strips the tunnel header of a frame arriving on the underlay: the inner
/// frame moves to the buffer's start; returns the switch's tunnel port.
/// ARP for the local endpoint is answered.
fn decap<T: Tracer>(
    t: &Tables,
    o: &crate::overlay::OverlayTables,
    learned: &mut Learned,
    p: &Parsed,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Result<LportId, Decision> {
    let ip = match p.l3 {
        L3::Ipv4(ip) if ip.dst == o.local_ip => ip,
        L3::Arp(a) if a.op == ARP_REQUEST && a.tpa == o.local_ip => {
            if arp_reply_in_place(buf, p, o.local_mac) {
                tr.note("overlay_decap", || {
                    format!("ARP for tunnel endpoint {}: reply", o.local_ip)
                });
                return Err(Decision {
                    verdict: Verdict::Reply,
                    outcome: Some(Outcome::ArpReplied),
                    learned: false,
                });
            }
            return Err(drop_(DropReason::MalformedArp));
        }
        _ => {
            tr.note("overlay_decap", || {
                format!("drop: not for tunnel endpoint {}", o.local_ip)
            });
            return Err(drop_(DropReason::OverlayNotForUs));
        }
    };
    let L4::Udp { dport, .. } = p.l4 else {
        tr.note("overlay_decap", || "drop: not UDP".into());
        return Err(drop_(DropReason::OverlayNotForUs));
    };
    if dport != o.udp_port {
        tr.note("overlay_decap", || format!("drop: UDP port {dport}"));
        return Err(drop_(DropReason::OverlayNotForUs));
    }
    let l3 = p.l3_offset;
    let fragment = buf.get(l3 + 6).is_some_and(|f| f & 0x20 != 0) || ip.later_fragment;
    let header_ok = buf
        .get(l3..l3 + ip.header_len)
        .is_some_and(|h| internet_checksum(h) == 0);
    let udp_len = get16(buf, p.l4_offset + 4).map_or(0, usize::from);
    let udp_end = p.l4_offset + udp_len;
    let malformed = |why: &'static str, tr: &mut T| {
        tr.note("overlay_decap", || format!("drop: {why}"));
        drop_(DropReason::OverlayMalformed)
    };
    if fragment || !header_ok {
        return Err(malformed("fragmented or bad outer IPv4 header", tr));
    }
    if udp_len < 8 || udp_end > l3 + ip.total_len {
        return Err(malformed("bad UDP length", tr));
    }
    let payload = buf.get(p.l4_offset + 8..udp_end).unwrap_or(&[]);
    let (vni, hlen) = match crate::overlay::parse_tunnel(o.encap, payload) {
        Ok(x) => x,
        Err(e) => {
            tr.note("overlay_decap", || format!("drop: {e}"));
            return Err(drop_(DropReason::OverlayMalformed));
        }
    };
    let Some(sw_id) = o.vni_switch.get(&vni).copied() else {
        tr.note("overlay_decap", || format!("drop: unknown VNI {vni}"));
        return Err(drop_(DropReason::OverlayUnknownVni));
    };
    let Some(tunnel_port) = t.switches.get(sw_id as usize).and_then(|s| s.tunnel_lport) else {
        return Err(drop_(DropReason::OverlayUnknownVni));
    };
    let start = p.l4_offset + 8 + hlen;
    if start >= udp_end || udp_end > buf.len() {
        return Err(malformed("no inner frame", tr));
    }
    buf.copy_within(start..udp_end, 0);
    *len = udp_end - start;
    learned.from_tunnel = true;
    learned.decapped += 1;
    tr.note("overlay_decap", || {
        format!(
            "VNI {vni} from remote endpoint {}: {} inner bytes",
            ip.src, *len
        )
    });
    Ok(tunnel_port)
}

/// The logical port a frame on (`in_port`, its VLAN) belongs to.
fn ingress<T: Tracer>(
    t: &Tables,
    in_port: u16,
    p: &Parsed,
    tr: &mut T,
) -> Result<LportId, Decision> {
    let vlan = p.vlan.unwrap_or(0);
    Ok(match t.ingress.get(&ingress_key(in_port, vlan)) {
        Some(Ingress::One(id)) => *id,
        Some(Ingress::BySourceMac(by_mac)) => match by_mac.get(&mac_key(&p.src)) {
            Some(id) => *id,
            None => {
                tr.note("ingress", || {
                    "drop: source MAC matches no port on this interface".into()
                });
                return Err(drop_(DropReason::UnknownIngress));
            }
        },
        None => {
            tr.note("ingress", || {
                format!("drop: no logical port on interface {in_port} VLAN {vlan}")
            });
            return Err(drop_(DropReason::UnknownIngress));
        }
    })
}

/// Everything after ingress: the frame `p` came from logical port `lp` on `sw`.
#[allow(clippy::too_many_arguments)]
fn forward<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    lport_id: LportId,
    lp: &crate::tables::Lport,
    sw: &crate::tables::Switch,
    p: &Parsed,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Decision {
    let p = *p;

    if lp.port_security {
        if lp.mac != Some(p.src) {
            tr.note("port_security", || {
                format!("drop: source MAC {} is not bound", mac_to_string(&p.src))
            });
            return drop_(DropReason::SpoofedMac);
        }
        let src_ip = match p.l3 {
            L3::Arp(a) if Some(a.sha) != lp.mac => {
                tr.note("port_security", || {
                    "drop: ARP sender MAC is not bound".into()
                });
                return drop_(DropReason::SpoofedMac);
            }
            L3::Arp(a) => Some(a.spa),
            L3::Ipv4(ip) => Some(ip.src),
            _ => None,
        };
        if let L3::Ipv6(ip6) = p.l3 {
            // :: (DAD) and link-local (ND, RS) are always allowed; others must be bound.
            let link_local = ip6.src.segments()[0] & 0xffc0 == 0xfe80;
            if !(ip6.src.is_unspecified() || link_local || lp.ips6.contains(&ip6.src)) {
                tr.note("port_security", || {
                    format!("drop: source IP {} is not bound", ip6.src)
                });
                return drop_(DropReason::SpoofedIp);
            }
        }
        // 0.0.0.0 is what a DHCP client or an ARP probe uses before it has an address.
        if let Some(ip) = src_ip.filter(|ip| !ip.is_unspecified()) {
            if !lp.ips.contains(&ip) {
                tr.note("port_security", || {
                    format!("drop: source IP {ip} is not bound")
                });
                return drop_(DropReason::SpoofedIp);
            }
        }
        tr.note("port_security", || "pass".into());
    }

    let mut learned_now = false;
    if lp.learning && !is_group(&p.src) {
        learned_now = learned.learn(lp.switch, &p.src, lport_id);
        if learned_now {
            tr.note("learn", || {
                format!("{} is behind {:?}", mac_to_string(&p.src), lp.name)
            });
        }
    }

    // DHCPv4 server for bound ports (crate::dhcp): answered in place, never flooded.
    if let Some(d) = crate::dhcp::stage(sw, lp, &p, buf, len, learned_now, tr) {
        return d;
    }

    if let (L3::Arp(a), Some(gw)) = (p.l3, sw.gateway) {
        // A router leg learns the hosts without a binding (an uplink's far
        // side) from their ARP, requests and replies alike.
        let unbound = lp.learning
            && a.spa != gw.ip
            && sw.subnet.contains(a.spa)
            && !sw.arp.contains_key(&u32::from(a.spa))
            && !is_group(&a.sha);
        if unbound && learned.learn_neighbor(lp.switch, a.spa, a.sha) {
            learned_now = true;
            tr.note("neighbor", || {
                format!("{} is at {}", a.spa, mac_to_string(&a.sha))
            });
        }
        if unbound && a.op == ARP_REPLY && p.dst == gw.mac {
            tr.note("neighbor", || "ARP reply to the router: taken".into());
            return Decision {
                verdict: Verdict::Consumed,
                outcome: Some(Outcome::NeighborLearned),
                learned: true,
            };
        }
    }

    if let L3::Arp(a) = p.l3 {
        if a.op == ARP_REQUEST && a.spa != a.tpa {
            if let Some(mac) = sw.arp.get(&u32::from(a.tpa)) {
                let mac = *mac;
                if arp_reply_in_place(buf, &p, mac) {
                    tr.note("arp_responder", || {
                        format!(
                            "{} is-at {}: reply to sender, not flooded",
                            a.tpa,
                            mac_to_string(&mac)
                        )
                    });
                    return Decision {
                        verdict: Verdict::Reply,
                        outcome: Some(Outcome::ArpReplied),
                        learned: learned_now,
                    };
                }
            }
            tr.note("arp_responder", || format!("{} is not bound: flood", a.tpa));
        }
    }

    if let (
        L3::Ipv6(ip6),
        L4::Icmpv6 {
            ty: ND_NEIGHBOR_SOLICIT,
            code: 0,
        },
    ) = (p.l3, p.l4)
    {
        let target = buf
            .get(p.l4_offset + 8..p.l4_offset + 24)
            .and_then(|t| <[u8; 16]>::try_from(t).ok());
        // RFC 4861 7.1.1: hop limit 255; DAD probes (from ::) are left to flood.
        if let Some(target) = target.filter(|_| ip6.hop_limit == 255 && !ip6.src.is_unspecified()) {
            if let Some(mac) = sw.nd.get(&u128::from_be_bytes(target)).copied() {
                if nd_advert_in_place(buf, len, &p, ip6.src, target, mac) {
                    tr.note("nd_responder", || {
                        format!(
                            "{} is-at {}: advert to sender, not flooded",
                            std::net::Ipv6Addr::from(target),
                            mac_to_string(&mac)
                        )
                    });
                    return Decision {
                        verdict: Verdict::Reply,
                        outcome: Some(Outcome::NdReplied),
                        learned: learned_now,
                    };
                }
            }
        }
    }

    if let Err(reason) = crate::stateful::from_lport(
        t,
        &mut learned.stateful,
        lport_id,
        &p,
        buf.get(..*len).unwrap_or(&[]),
        tr,
    ) {
        return drop_(reason);
    }
    if let Err(reason) = qos_egress(t, learned, lport_id, &p, buf, *len, tr) {
        return drop_(reason);
    }

    if let Some(gw) = sw.gateway.filter(|gw| gw.mac == p.dst) {
        let mut d = route(t, learned, &p, &gw, buf, len, tr);
        d.learned |= learned_now;
        return d;
    }

    let flood = Decision {
        verdict: Verdict::Flood {
            switch: lp.switch,
            except: lport_id,
        },
        outcome: Some(Outcome::L2Flood),
        learned: learned_now,
    };
    if is_group(&p.dst) {
        tr.note("l2_forward", || {
            format!("{} is a group address: flood", mac_to_string(&p.dst))
        });
        return flood;
    }
    let dst = sw
        .macs
        .get(&mac_key(&p.dst))
        .copied()
        .or_else(|| learned.lookup(lp.switch, &p.dst));
    match dst.and_then(|d| t.lports.get(d as usize).map(|l| (d, l))) {
        Some((d, _)) if d == lport_id => {
            tr.note("l2_forward", || {
                "drop: destination is the ingress port".into()
            });
            drop_(DropReason::Hairpin)
        }
        Some((d, out)) => {
            if let Err(reason) = crate::stateful::to_lport(
                t,
                &mut learned.stateful,
                d,
                &p,
                buf.get(..*len).unwrap_or(&[]),
                tr,
            ) {
                return drop_(reason);
            }
            if let Err(reason) = qos_ingress(t, learned, d, *len, tr) {
                return drop_(reason);
            }
            if out.remote.is_some() {
                tr.note("l2_forward", || {
                    format!("{} → remote port {:?}", mac_to_string(&p.dst), out.name)
                });
                if let Some(d) = too_big(t, sw, sw.gateway, &p, buf, len, tr) {
                    return d;
                }
                return tunnel(t, out, sw, &p, Outcome::L2Unicast, tr);
            }
            tr.note("l2_forward", || {
                format!(
                    "{} → logical port {:?} (interface {})",
                    mac_to_string(&p.dst),
                    out.name,
                    out.port
                )
            });
            Decision {
                verdict: Verdict::Unicast { port: out.port },
                outcome: Some(Outcome::L2Unicast),
                learned: learned_now,
            }
        }
        None => {
            tr.note("l2_forward", || {
                format!("{} unknown: flood", mac_to_string(&p.dst))
            });
            flood
        }
    }
}

/// QoS of the port a frame comes from: its egress meter, then DSCP marking.
// hot path: one index for ports without QoS.
fn qos_egress<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    lport: LportId,
    p: &Parsed,
    buf: &mut [u8],
    len: usize,
    tr: &mut T,
) -> Result<(), DropReason> {
    let Some(q) = t.qos.port(lport).copied() else {
        return Ok(());
    };
    if let Some(m) = q.egress {
        police(t, learned, m, len, "qos_out", tr)?;
    }
    if let Some(dscp) = q.dscp {
        if crate::qos::mark_dscp(buf, p, dscp) {
            tr.note("qos_out", || format!("DSCP set to {dscp}"));
        }
    }
    Ok(())
}

/// QoS of the port a frame is delivered to: its ingress meter.
// hot path: one index for ports without QoS.
fn qos_ingress<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    lport: LportId,
    len: usize,
    tr: &mut T,
) -> Result<(), DropReason> {
    let Some(m) = t.qos.port(lport).and_then(|q| q.ingress) else {
        return Ok(());
    };
    police(t, learned, m, len, "qos_in", tr)
}

/// Runs meter `m` on a `len`-byte frame for `stage`.
// hot path: integer arithmetic; the trace closures compile away.
fn police<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    m: u16,
    len: usize,
    stage: &'static str,
    tr: &mut T,
) -> Result<(), DropReason> {
    if !learned.qos.police(m, len) {
        tr.note(stage, || {
            format!(
                "drop: {len} bytes over the rate of meter {}",
                meter_name(t, m)
            )
        });
        return Err(DropReason::QosMeterDropped);
    }
    tr.note(stage, || {
        format!("{len} bytes conform to meter {}", meter_name(t, m))
    });
    Ok(())
}

fn meter_name(t: &Tables, m: u16) -> &str {
    t.qos
        .meters
        .get(usize::from(m))
        .map_or("?", |m| m.name.as_str())
}

/// Turns an ARP request for `mac`'s IP into the reply, in place.
fn arp_reply_in_place(buf: &mut [u8], p: &Parsed, mac: Mac) -> bool {
    let L3::Arp(a) = p.l3 else { return false };
    let o = p.l3_offset;
    put(buf, 0, &p.src)
        && put(buf, 6, &mac)
        && put(buf, o + 6, &ARP_REPLY.to_be_bytes())
        && put(buf, o + 8, &mac)
        && put(buf, o + 14, &a.tpa.octets())
        && put(buf, o + 18, &a.sha)
        && put(buf, o + 24, &a.spa.octets())
}

/// Rewrites the frame into a broadcast ARP request from `mac`/`ip` for
/// `target` (on `vlan`, 0 = untagged).
pub(crate) fn arp_request_in_place(
    buf: &mut [u8],
    len: &mut usize,
    vlan: u16,
    mac: Mac,
    ip: Ipv4Addr,
    target: Ipv4Addr,
) -> bool {
    let o: usize = if vlan == 0 { 14 } else { 18 };
    let end = o + 28;
    if buf.len() < end {
        return false;
    }
    let tag_ok = if vlan == 0 {
        put(buf, 12, &0x0806u16.to_be_bytes())
    } else {
        put(buf, 12, &ETHERTYPE_VLAN.to_be_bytes())
            && put(buf, 14, &vlan.to_be_bytes())
            && put(buf, 16, &0x0806u16.to_be_bytes())
    };
    let ok = put(buf, 0, &[0xff; 6])
        && put(buf, 6, &mac)
        && tag_ok
        // Ethernet, IPv4, 6-byte MACs, 4-byte addresses.
        && put(buf, o, &[0, 1, 8, 0, 6, 4])
        && put(buf, o + 6, &ARP_REQUEST.to_be_bytes())
        && put(buf, o + 8, &mac)
        && put(buf, o + 14, &ip.octets())
        && put(buf, o + 18, &[0; 6])
        && put(buf, o + 24, &target.octets());
    if ok {
        *len = end;
    }
    ok
}

fn route<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    p: &Parsed,
    gw: &Gateway,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Decision {
    let ip = match p.l3 {
        L3::Ipv4(ip) => ip,
        L3::Ipv6(ip6) => return route6(t, learned, p, &ip6, gw, buf, len, tr),
        _ => {
            tr.note("router", || "drop: not IP".into());
            return drop_(DropReason::RouterNotIpv4);
        }
    };
    let l3 = p.l3_offset;
    let header_ok = l3
        .checked_add(ip.header_len)
        .and_then(|end| buf.get(l3..end))
        .is_some_and(|h| internet_checksum(h) == 0);
    if !header_ok {
        tr.note("router", || "drop: bad IPv4 header checksum".into());
        return drop_(DropReason::BadIpv4Checksum);
    }
    let Some(router) = t.routers.get(gw.router as usize) else {
        return drop_(DropReason::RouterNotIpv4);
    };
    if let Some(n) = t.nat64.get(gw.router as usize).and_then(Option::as_ref) {
        if n.owns(ip.dst) {
            if let Err(reason) = crate::nat64::to_v6(n, &mut learned.stateful, p, &ip, buf, len, tr)
            {
                return drop_(reason);
            }
            let Some(Ok(p6)) = buf.get(..*len).map(parse) else {
                return drop_(DropReason::MalformedIpv6);
            };
            let L3::Ipv6(ip6) = p6.l3 else {
                return drop_(DropReason::MalformedIpv6);
            };
            let mut d = route6(t, learned, &p6, &ip6, gw, buf, len, tr);
            if d.outcome == Some(Outcome::Routed) {
                d.outcome = Some(Outcome::Nat64To6);
            }
            return d;
        }
    }
    // Floating-IP ingress meter: on the address the packet was sent to (before DNAT).
    if !t.qos.floating.is_empty() {
        let m = t
            .qos
            .floating
            .get(&u32::from(ip.dst))
            .and_then(|q| q.ingress);
        if let Some(m) = m {
            if let Err(reason) = police(t, learned, m, *len, "qos_in", tr) {
                return drop_(reason);
            }
        }
    }
    // NAT / firewall: translate tracked connections, DNAT first packets.
    let pre = match crate::nat::pre_route(t, &mut learned.stateful, gw.router, p, buf, *len, tr) {
        Ok(pre) => pre,
        Err(reason) => return drop_(reason),
    };
    let reparsed;
    let (p, ip) = if pre.rewritten() {
        reparsed = match buf.get(..*len).map(parse) {
            Some(Ok(p)) => p,
            _ => return drop_(DropReason::MalformedIpv4),
        };
        match reparsed.l3 {
            L3::Ipv4(ip) => (&reparsed, ip),
            _ => return drop_(DropReason::MalformedIpv4),
        }
    } else {
        (p, ip)
    };
    if router.own_ips.contains(&ip.dst) {
        if let Some(d) = crate::lb4_health::take_answer(t, p, &ip, buf, len, tr) {
            return d;
        }
        if p.l4
            == (L4::Icmp {
                ty: ICMP_ECHO_REQUEST,
                code: 0,
            })
            && echo_reply_in_place(buf, p, &ip, gw.mac)
        {
            tr.note("router", || {
                format!("echo request to gateway {}: reply", ip.dst)
            });
            return Decision {
                verdict: Verdict::Reply,
                outcome: Some(Outcome::RouterEchoReplied),
                learned: false,
            };
        }
        tr.note("router", || {
            format!("drop: to gateway {} (only echo is answered)", ip.dst)
        });
        return drop_(DropReason::RouterLocalUnsupported);
    }
    if ip.ttl <= 1 {
        tr.note("router", || {
            format!("TTL {} expires: ICMP time exceeded to {}", ip.ttl, ip.src)
        });
        return icmp_error(
            buf,
            len,
            p,
            &ip,
            gw,
            ICMP_TIME_EXCEEDED,
            0,
            [0; 4],
            Outcome::IcmpTimeExceeded,
        );
    }
    let policy = t
        .policies
        .lookup(gw.router, gw.ip, ip.src, ip.dst, ip.proto);
    if let Some(pol) = policy {
        learned.policy.hit(pol.index);
        tr.note("router_policy", || {
            format!(
                "policy {} (priority {}) matches: {:?}",
                pol.index, pol.priority, pol.action
            )
        });
    }
    let rerouted = match policy.map(|p| p.action) {
        Some(crate::policy::Action::Drop) => {
            tr.note("router_policy", || "drop".into());
            return drop_(DropReason::PolicyDropped);
        }
        Some(crate::policy::Action::Reroute { switch, next_hop }) => Some(crate::tables::Route {
            switch,
            next_hop: Some(next_hop),
        }),
        _ => None,
    };
    let Some(r) = rerouted.or_else(|| {
        router
            .routes
            .lookup(ip.dst)
            .and_then(|group| match group.len() {
                1 => group.first().copied(),
                n => group.get(flow_hash(p, &ip) as usize % n.max(1)).copied(),
            })
    }) else {
        tr.note("router", || {
            format!("no route to {}: ICMP net unreachable to {}", ip.dst, ip.src)
        });
        return icmp_error(
            buf,
            len,
            p,
            &ip,
            gw,
            ICMP_DEST_UNREACHABLE,
            0,
            [0; 4],
            Outcome::IcmpNetUnreachable,
        );
    };
    let next_hop = r.next_hop.unwrap_or(ip.dst);
    let Some(out_sw) = t.switches.get(r.switch as usize) else {
        return drop_(DropReason::NoNeighbor);
    };
    let resnat;
    let p = match pre {
        crate::nat::PreRoute::New { orig, cur, lb, .. } => {
            match crate::nat::post_route(
                t,
                &mut learned.stateful,
                gw.router,
                orig,
                cur,
                r.switch,
                lb,
                p,
                buf.get_mut(..*len).unwrap_or(&mut []),
                tr,
            ) {
                Ok(false) => p,
                Ok(true) => {
                    resnat = match buf.get(..*len).map(parse) {
                        Some(Ok(p)) => p,
                        _ => return drop_(DropReason::MalformedIpv4),
                    };
                    &resnat
                }
                Err(reason) => return drop_(reason),
            }
        }
        _ => p,
    };
    // Floating-IP egress meter: on the address the packet leaves from (after SNAT).
    if !t.qos.floating.is_empty() {
        if let L3::Ipv4(fin) = p.l3 {
            let m = t
                .qos
                .floating
                .get(&u32::from(fin.src))
                .and_then(|q| q.egress);
            if let Some(m) = m {
                if let Err(reason) = police(t, learned, m, *len, "qos_out", tr) {
                    return drop_(reason);
                }
            }
        }
    }
    tr.note("router", || {
        format!(
            "route {} → switch {:?} next hop {}",
            ip.dst, out_sw.name, next_hop
        )
    });
    let nh_mac = out_sw
        .arp
        .get(&u32::from(next_hop))
        .copied()
        .or_else(|| learned.neighbor(r.switch, next_hop));
    if let (None, Some(out_gw)) = (nh_mac, out_sw.gateway) {
        // Unknown next hop on a switch with unbound hosts: this packet
        // becomes the router's ARP request for it (the sender retransmits).
        if out_sw.subnet.contains(next_hop)
            && learned.should_ask(r.switch, next_hop)
            && arp_request_in_place(buf, len, out_sw.vlan, out_gw.mac, out_gw.ip, next_hop)
        {
            tr.note("router", || {
                format!(
                    "next hop {next_hop} unknown: ARP request from {}",
                    out_gw.ip
                )
            });
            return Decision {
                verdict: Verdict::Flood {
                    switch: r.switch,
                    except: LportId::MAX,
                },
                outcome: Some(Outcome::ArpRequested),
                learned: true,
            };
        }
    }
    let out = nh_mac.and_then(|m| {
        out_sw
            .macs
            .get(&mac_key(&m))
            .copied()
            .or_else(|| learned.lookup(r.switch, &m))
    });
    let out_id = out;
    let (Some(nh_mac), Some(out), Some(out_gw)) = (
        nh_mac,
        out.and_then(|o| t.lports.get(o as usize)),
        out_sw.gateway,
    ) else {
        tr.note("router", || {
            format!("drop: next hop {next_hop} has no bound MAC/port")
        });
        return drop_(DropReason::NoNeighbor);
    };
    if let Some(out_id) = out_id {
        if let Err(reason) = crate::stateful::to_lport(
            t,
            &mut learned.stateful,
            out_id,
            p,
            buf.get(..*len).unwrap_or(&[]),
            tr,
        ) {
            return drop_(reason);
        }
        if let Err(reason) = qos_ingress(t, learned, out_id, *len, tr) {
            return drop_(reason);
        }
    }
    if out.remote.is_some() {
        if let Some(d) = too_big(t, out_sw, Some(*gw), p, buf, len, tr) {
            return d;
        }
    }

    // TTL is the high byte of the 16-bit word at offset 8 (TTL, protocol).
    let ttl_word = u16::from_be_bytes([ip.ttl, ip.proto]);
    let new_word = u16::from_be_bytes([ip.ttl - 1, ip.proto]);
    let Some(csum) = get16(buf, l3 + 10) else {
        return drop_(DropReason::MalformedIpv4);
    };
    let csum = update16(csum, ttl_word, new_word);
    if !(put(buf, l3 + 8, &[ip.ttl - 1]) && put(buf, l3 + 10, &csum.to_be_bytes())) {
        return drop_(DropReason::MalformedIpv4);
    }
    if !(set_vlan(buf, len, p.vlan.is_some(), out_sw.vlan)
        && put(buf, 0, &nh_mac)
        && put(buf, 6, &out_gw.mac))
    {
        return drop_(DropReason::Oversize);
    }
    tr.note("router", || {
        format!(
            "TTL {} → {}, {} → {} via logical port {:?}",
            ip.ttl,
            ip.ttl - 1,
            mac_to_string(&out_gw.mac),
            mac_to_string(&nh_mac),
            out.name
        )
    });
    if out.remote.is_some() {
        return tunnel(t, out, out_sw, p, Outcome::Routed, tr);
    }
    Decision {
        verdict: Verdict::Unicast { port: out.port },
        outcome: Some(Outcome::Routed),
        learned: false,
    }
}

/// The frame's length once forwarded onto `out_sw` (its VLAN tag added or removed).
fn forwarded_len(p: &Parsed, len: usize, out_sw: &crate::tables::Switch) -> usize {
    let tagged_in = if p.vlan.is_some() { 4 } else { 0 };
    let tagged_out = if out_sw.vlan != 0 { 4 } else { 0 };
    (len + tagged_out).saturating_sub(tagged_in)
}

/// When the frame, encapsulated, would exceed the underlay MTU: the ICMP
/// "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big" to its
/// sender from the ingress gateway `gw`, announcing the inner MTU; else a
/// counted drop (IPv4 without DF: no fragmentation here; no gateway to
/// answer from).
fn too_big<T: Tracer>(
    t: &Tables,
    out_sw: &crate::tables::Switch,
    gw: Option<Gateway>,
    p: &Parsed,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Option<Decision> {
    let o = t.overlay.as_ref()?;
    let frame_len = forwarded_len(p, *len, out_sw);
    if o.fits(frame_len) {
        return None;
    }
    let vlan = if out_sw.vlan != 0 { 4 } else { 0 };
    let mtu = o.inner_mtu().saturating_sub(vlan);
    let mtu16 = u16::try_from(mtu).unwrap_or(u16::MAX);
    let df = buf.get(p.l3_offset + 6).is_some_and(|f| f & 0x40 != 0);
    match (p.l3, gw) {
        (L3::Ipv4(ip), Some(gw)) if df => {
            tr.note("overlay_encap", || {
                format!(
                    "{frame_len}-byte frame exceeds underlay MTU {}: ICMP fragmentation needed (MTU {mtu}) to {}",
                    o.mtu, ip.src
                )
            });
            let [hi, lo] = mtu16.to_be_bytes();
            Some(icmp_error(
                buf,
                len,
                p,
                &ip,
                &gw,
                ICMP_DEST_UNREACHABLE,
                4,
                [0, 0, hi, lo],
                Outcome::IcmpFragNeeded,
            ))
        }
        (
            L3::Ipv6(ip6),
            Some(Gateway {
                mac,
                ip6: Some(from),
                ..
            }),
        ) => {
            tr.note("overlay_encap", || {
                format!(
                    "{frame_len}-byte frame exceeds underlay MTU {}: ICMPv6 packet too big (MTU {mtu}) to {}",
                    o.mtu, ip6.src
                )
            });
            Some(packet_too_big(buf, len, p, &ip6, mac, from, mtu16))
        }
        _ => {
            tr.note("overlay_encap", || {
                format!(
                    "drop: {frame_len}-byte frame exceeds underlay MTU {} (no DF or no gateway to answer from)",
                    o.mtu
                )
            });
            Some(drop_(DropReason::OverlayTooBig))
        }
    }
}

/// The verdict sending the (forwarded) frame to remote port `out` on `out_sw`.
fn tunnel<T: Tracer>(
    t: &Tables,
    out: &crate::tables::Lport,
    out_sw: &crate::tables::Switch,
    p: &Parsed,
    outcome: Outcome,
    tr: &mut T,
) -> Decision {
    let (Some(o), Some(endpoint), Some(vni)) = (t.overlay.as_ref(), out.remote, out_sw.vni) else {
        return drop_(DropReason::OverlayUnknownVni);
    };
    tr.note("overlay_encap", || {
        let ep = o
            .endpoints
            .get(usize::from(endpoint))
            .map_or_else(|| "?".to_string(), |e| e.ip.to_string());
        format!(
            "{:?} VNI {vni} to remote endpoint {ep} ({:?} is there)",
            o.encap, out.name
        )
    });
    Decision {
        verdict: Verdict::Tunnel {
            endpoint,
            vni,
            entropy: entropy(p),
        },
        outcome: Some(outcome),
        learned: false,
    }
}

/// A flow hash for the outer UDP source port (same flow, same port).
fn entropy(p: &Parsed) -> u16 {
    use std::hash::Hasher;
    let h = match p.l3 {
        L3::Ipv4(ip) => flow_hash(p, &ip),
        L3::Ipv6(ip6) => {
            let (sport, dport) = match p.l4 {
                L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
                _ => (0, 0),
            };
            let mut h = fastmap::FastHasher::default();
            h.write_u128(u128::from(ip6.src));
            h.write_u128(u128::from(ip6.dst));
            h.write_u32((u32::from(sport) << 16) | u32::from(dport));
            u32::try_from(h.finish() >> 32).unwrap_or(0)
        }
        _ => {
            let mut h = fastmap::FastHasher::default();
            h.write_u64(mac_key(&p.src));
            h.write_u64(mac_key(&p.dst));
            u32::try_from(h.finish() >> 32).unwrap_or(0)
        }
    };
    u16::try_from((h ^ (h >> 16)) & 0xffff).unwrap_or(0)
}

/// Replaces the frame with an ICMPv6 "packet too big" (RFC 4443 3.2) to its
/// sender from gateway `from`/`mac`, quoting as much of it as keeps the
/// error within the IPv6 minimum MTU.
fn packet_too_big(
    buf: &mut [u8],
    len: &mut usize,
    p: &Parsed,
    ip6: &crate::packet::parse::Ipv6Info,
    mac: Mac,
    from: std::net::Ipv6Addr,
    mtu: u16,
) -> Decision {
    let about_error = matches!(p.l4, L4::Icmpv6 { ty, .. } if ty < 128);
    if about_error || ip6.src.is_unspecified() || ip6.src.is_multicast() || is_group(&p.src) {
        return drop_(DropReason::IcmpErrorSuppressed);
    }
    let l3 = p.l3_offset;
    let quote = (*len - l3).min(1280 - 48);
    let new_len = l3 + 48 + quote;
    if new_len > buf.len() || l3 + quote > *len {
        return drop_(DropReason::IcmpErrorSuppressed);
    }
    buf.copy_within(l3..l3 + quote, l3 + 48);
    let icmp_len = 8 + quote;
    let icmp_len16 = u16::try_from(icmp_len).unwrap_or(u16::MAX);
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&icmp_len16.to_be_bytes());
    ip[6] = crate::packet::headers::IPPROTO_ICMPV6;
    ip[7] = 255;
    ip[8..24].copy_from_slice(&from.octets());
    ip[24..40].copy_from_slice(&ip6.src.octets());
    let mut icmp = [0u8; 8];
    icmp[0] = 2; // packet too big
    icmp[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
    let ok =
        put(buf, 0, &p.src) && put(buf, 6, &mac) && put(buf, l3, &ip) && put(buf, l3 + 40, &icmp);
    let Some(body) = buf.get(l3 + 40..new_len) else {
        return drop_(DropReason::IcmpErrorSuppressed);
    };
    let mut sum = checksum::accumulate(0, &from.octets());
    sum = checksum::accumulate(sum, &ip6.src.octets());
    sum = checksum::accumulate(
        sum,
        &[
            0,
            0,
            icmp_len16.to_be_bytes()[0],
            icmp_len16.to_be_bytes()[1],
            0,
            0,
            0,
            crate::packet::headers::IPPROTO_ICMPV6,
        ],
    );
    sum = checksum::accumulate(sum, body);
    let c = checksum::finish(sum);
    if !(ok && put(buf, l3 + 42, &c.to_be_bytes())) {
        return drop_(DropReason::IcmpErrorSuppressed);
    }
    *len = new_len;
    Decision {
        verdict: Verdict::Reply,
        outcome: Some(Outcome::Icmp6PacketTooBig),
        learned: false,
    }
}

/// IPv6 forwarding over connected subnets: hop-limit decrement (IPv6 has no
/// header checksum), next-hop MAC from bindings, VLAN fix-up.
#[allow(clippy::too_many_arguments)]
fn route6<T: Tracer>(
    t: &Tables,
    learned: &mut Learned,
    p: &Parsed,
    ip6: &crate::packet::parse::Ipv6Info,
    gw: &Gateway,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Decision {
    let Some(router) = t.routers.get(gw.router as usize) else {
        return drop_(DropReason::RouterNotIpv4);
    };
    if router.own_ips6.contains(&ip6.dst) {
        tr.note("router", || {
            format!("drop: to gateway {} (not answered)", ip6.dst)
        });
        return drop_(DropReason::RouterLocalUnsupported);
    }
    if ip6.hop_limit <= 1 {
        tr.note("router", || {
            "drop: hop limit expires (no ICMPv6 error yet)".into()
        });
        return drop_(DropReason::HopLimitExceeded);
    }
    if let Some(n) = t.nat64.get(gw.router as usize).and_then(Option::as_ref) {
        if n.embeds(ip6.dst) {
            if let Err(reason) =
                crate::nat64::to_v4(n, &mut learned.stateful, t.generation, p, ip6, buf, len, tr)
            {
                return drop_(reason);
            }
            let Some(Ok(p4)) = buf.get(..*len).map(parse) else {
                return drop_(DropReason::MalformedIpv4);
            };
            let mut d = route(t, learned, &p4, gw, buf, len, tr);
            if d.outcome == Some(Outcome::Routed) {
                d.outcome = Some(Outcome::Nat64To4);
            }
            return d;
        }
    }
    let dst = u128::from(ip6.dst);
    let Some(r) = router
        .routes6
        .iter()
        .find(|r| dst & crate::tables::mask6(r.len) == r.prefix)
    else {
        tr.note("router", || format!("drop: no IPv6 route to {}", ip6.dst));
        return drop_(DropReason::NoRoute6);
    };
    let Some(out_sw) = t.switches.get(r.switch as usize) else {
        return drop_(DropReason::NoNeighbor);
    };
    let nh_mac = out_sw.nd.get(&dst).copied();
    let out = nh_mac.and_then(|m| {
        out_sw
            .macs
            .get(&mac_key(&m))
            .copied()
            .or_else(|| learned.lookup(r.switch, &m))
    });
    let out_id = out;
    let (Some(nh_mac), Some(out), Some(out_gw)) = (
        nh_mac,
        out.and_then(|o| t.lports.get(o as usize)),
        out_sw.gateway,
    ) else {
        tr.note("router", || {
            format!("drop: {} has no bound MAC/port", ip6.dst)
        });
        return drop_(DropReason::NoNeighbor);
    };
    if let Some(out_id) = out_id {
        if let Err(reason) = crate::stateful::to_lport(
            t,
            &mut learned.stateful,
            out_id,
            p,
            buf.get(..*len).unwrap_or(&[]),
            tr,
        ) {
            return drop_(reason);
        }
        if let Err(reason) = qos_ingress(t, learned, out_id, *len, tr) {
            return drop_(reason);
        }
    }
    if out.remote.is_some() {
        if let Some(d) = too_big(t, out_sw, Some(*gw), p, buf, len, tr) {
            return d;
        }
    }
    if !(put(buf, p.l3_offset + 7, &[ip6.hop_limit - 1])
        && set_vlan(buf, len, p.vlan.is_some(), out_sw.vlan)
        && put(buf, 0, &nh_mac)
        && put(buf, 6, &out_gw.mac))
    {
        return drop_(DropReason::Oversize);
    }
    tr.note("router", || {
        format!(
            "IPv6 {} → switch {:?} hop limit {} → {} via {:?}",
            ip6.dst,
            out_sw.name,
            ip6.hop_limit,
            ip6.hop_limit - 1,
            out.name
        )
    });
    if out.remote.is_some() {
        return tunnel(t, out, out_sw, p, Outcome::Routed, tr);
    }
    Decision {
        verdict: Verdict::Unicast { port: out.port },
        outcome: Some(Outcome::Routed),
        learned: false,
    }
}

/// Hash of the 5-tuple, for picking an ECMP next hop per flow.
fn flow_hash(p: &Parsed, ip: &Ipv4Info) -> u32 {
    use std::hash::Hasher;
    let (sport, dport) = match p.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
        _ => (0, 0),
    };
    let mut h = fastmap::FastHasher::default();
    h.write_u32(u32::from(ip.src));
    h.write_u32(u32::from(ip.dst));
    h.write_u16(u16::from(ip.proto));
    h.write_u32((u32::from(sport) << 16) | u32::from(dport));
    // The high bits are the best mixed.
    u32::try_from(h.finish() >> 32).unwrap_or(0)
}

/// Makes the frame carry `vlan` (0 = untagged), moving the payload by the tag size.
fn set_vlan(buf: &mut [u8], len: &mut usize, tagged: bool, vlan: u16) -> bool {
    match (tagged, vlan) {
        (false, 0) => true,
        (true, 0) => {
            let Some(n) = len.checked_sub(4).filter(|n| *n >= 14) else {
                return false;
            };
            if buf.get(16..*len).is_none() {
                return false;
            }
            buf.copy_within(16..*len, 12);
            *len = n;
            true
        }
        (true, v) => put(buf, 14, &v.to_be_bytes()),
        (false, v) => {
            let end = *len + 4;
            if end > buf.len() || *len < 14 {
                return false;
            }
            buf.copy_within(12..*len, 16);
            *len = end;
            put(buf, 12, &ETHERTYPE_VLAN.to_be_bytes()) && put(buf, 14, &v.to_be_bytes())
        }
    }
}

const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;

/// Replaces a neighbor solicitation with the solicited advertisement for
/// `target` at `mac` (RFC 4861 4.4: solicited + override, target link-layer option).
fn nd_advert_in_place(
    buf: &mut [u8],
    len: &mut usize,
    p: &Parsed,
    to: std::net::Ipv6Addr,
    target: [u8; 16],
    mac: Mac,
) -> bool {
    let l3 = p.l3_offset;
    let mut icmp = [0u8; 32];
    icmp[0] = ND_NEIGHBOR_ADVERT;
    icmp[4] = 0x60; // S and O flags
    icmp[8..24].copy_from_slice(&target);
    icmp[24] = 2; // target link-layer address option, 1 unit of 8 bytes
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&mac);
    let mut sum = checksum::accumulate(0, &target);
    sum = checksum::accumulate(sum, &to.octets());
    sum = checksum::accumulate(
        sum,
        &[0, 0, 0, 32, 0, 0, 0, crate::packet::headers::IPPROTO_ICMPV6],
    );
    sum = checksum::accumulate(sum, &icmp);
    let c = checksum::finish(sum);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&32u16.to_be_bytes());
    ip[6] = crate::packet::headers::IPPROTO_ICMPV6;
    ip[7] = 255;
    ip[8..24].copy_from_slice(&target);
    ip[24..40].copy_from_slice(&to.octets());
    let end = l3 + 40 + 32;
    let ok = end <= buf.len()
        && put(buf, 0, &p.src)
        && put(buf, 6, &mac)
        && put(buf, l3, &ip)
        && put(buf, l3 + 40, &icmp);
    if ok {
        *len = end;
    }
    ok
}

/// Answers an echo request to a gateway address in place.
fn echo_reply_in_place(buf: &mut [u8], p: &Parsed, ip: &Ipv4Info, gw_mac: Mac) -> bool {
    let (l3, l4) = (p.l3_offset, p.l4_offset);
    let Some(ip_csum) = get16(buf, l3 + 10) else {
        return false;
    };
    let Some(icmp_csum) = get16(buf, l4 + 2) else {
        return false;
    };
    // Swapping source and destination leaves the header sum unchanged.
    let ip_csum = update16(
        ip_csum,
        u16::from_be_bytes([ip.ttl, ip.proto]),
        u16::from_be_bytes([64, ip.proto]),
    );
    let icmp_csum = update16(
        icmp_csum,
        u16::from(ICMP_ECHO_REQUEST) << 8,
        u16::from(ICMP_ECHO_REPLY) << 8,
    );
    put(buf, 0, &p.src)
        && put(buf, 6, &gw_mac)
        && put(buf, l3 + 8, &[64])
        && put(buf, l3 + 10, &ip_csum.to_be_bytes())
        && put(buf, l3 + 12, &ip.dst.octets())
        && put(buf, l3 + 16, &ip.src.octets())
        && put(buf, l4, &[ICMP_ECHO_REPLY])
        && put(buf, l4 + 2, &icmp_csum.to_be_bytes())
}

/// Replaces the frame with an ICMP error about it, addressed to its sender
/// from the ingress gateway (RFC 792: IP header + first 8 payload bytes quoted).
#[allow(clippy::too_many_arguments)]
fn icmp_error(
    buf: &mut [u8],
    len: &mut usize,
    p: &Parsed,
    ip: &Ipv4Info,
    gw: &Gateway,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    outcome: Outcome,
) -> Decision {
    // RFC 1812 4.3.2.7: never about ICMP errors, non-first fragments, or
    // packets whose source is not a single host.
    let about_error =
        matches!(p.l4, L4::Icmp { ty, .. } if ty != ICMP_ECHO_REQUEST && ty != ICMP_ECHO_REPLY);
    let bad_source = ip.src.is_unspecified()
        || ip.src.is_broadcast()
        || ip.src.is_multicast()
        || is_group(&p.src);
    if about_error || ip.later_fragment || bad_source {
        return drop_(DropReason::IcmpErrorSuppressed);
    }
    let l3 = p.l3_offset;
    let quote = ip.total_len.min(ip.header_len + 8);
    let icmp_len = 8 + quote;
    let total = 20 + icmp_len;
    let new_len = l3 + total;
    if new_len > buf.len() || l3 + quote > *len {
        return drop_(DropReason::IcmpErrorSuppressed);
    }
    buf.copy_within(l3..l3 + quote, l3 + 28);
    let total16 = u16::try_from(total).unwrap_or(u16::MAX);
    let mut hdr = [0u8; 20];
    hdr[0] = 0x45;
    hdr[2..4].copy_from_slice(&total16.to_be_bytes());
    hdr[8] = 64;
    hdr[9] = IPPROTO_ICMP;
    hdr[12..16].copy_from_slice(&gw.ip.octets());
    hdr[16..20].copy_from_slice(&ip.src.octets());
    let c = internet_checksum(&hdr);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp_hdr = [ty, code, 0, 0, rest[0], rest[1], rest[2], rest[3]];
    let ok = put(buf, 0, &p.src)
        && put(buf, 6, &gw.mac)
        && put(buf, l3, &hdr)
        && put(buf, l3 + 20, &icmp_hdr);
    let Some(icmp) = buf.get_mut(l3 + 20..new_len) else {
        return drop_(DropReason::IcmpErrorSuppressed);
    };
    let c = internet_checksum(icmp);
    if !(ok && put(buf, l3 + 22, &c.to_be_bytes())) {
        return drop_(DropReason::IcmpErrorSuppressed);
    }
    *len = new_len;
    Decision {
        verdict: Verdict::Reply,
        outcome: Some(outcome),
        learned: false,
    }
}

fn describe(p: &Parsed) -> String {
    let vlan = p.vlan.map(|v| format!(" vlan {v}")).unwrap_or_default();
    let l3 = match p.l3 {
        L3::Arp(a) => format!("ARP op {} {} asks {}", a.op, a.spa, a.tpa),
        L3::Ipv4(ip) => format!(
            "IPv4 {} → {} ttl {} proto {}",
            ip.src, ip.dst, ip.ttl, ip.proto
        ),
        L3::Ipv6(ip) => format!("IPv6 {} → {} hop limit {}", ip.src, ip.dst, ip.hop_limit),
        L3::Other(t) => format!("ethertype {t:#06x}"),
    };
    format!(
        "{} → {}{vlan} {l3} {:?}",
        mac_to_string(&p.src),
        mac_to_string(&p.dst),
        p.l4
    )
}

/// The destination IPv4 address of a parsed frame, for tests and traces.
pub fn ipv4_dst(p: &Parsed) -> Option<Ipv4Addr> {
    match p.l3 {
        L3::Ipv4(ip) => Some(ip.dst),
        _ => None,
    }
}
