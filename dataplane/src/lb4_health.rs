//! Health monitors of the L4 load balancer ([`crate::lb4`]): TCP connect
//! probes sent by the data plane itself, the way OVN's service monitor
//! does, because the members live in tenant networks no host process
//! reaches.
//!
//! # Design
//!
//! - **Probe.** A SYN from the router's address on the member's subnet,
//!   source port `PROBE_PORT_BASE + slot` (the member's counter slot: the
//!   reply names its member, no table needed), to the member's address and
//!   port; or (`ping`) an ICMP echo request with that number as its
//!   identifier; or (`udp_connect`) an empty datagram from that port. It passes the member port's security group like routed traffic
//!   (so the member's answer is an established connection there), and is
//!   sent by the worker that owns its flow, where the answer will arrive.
//! - **Answer.** A SYN-ACK to the router's address and a probe port counts
//!   as answered and is turned into a RST in place (the member's half-open
//!   connection is closed at once, its backlog never fills); a RST counts
//!   as refused; an echo reply with a probe identifier, or a datagram to a
//!   probe port, counts as answered; an ICMP port unreachable quoting a
//!   probe counts as refused. None goes further. A `udp_connect` round
//!   fails only on a refusal (UDP may stay silent: Octavia's semantics, which
//!   relies on the member's ICMP not being rate limited below the probe
//!   rate).
//! - **Verdict.** A monitor thread ([`run`]) starts a round per load
//!   balancer every `interval_ms` (workers see the round counter move at
//!   their next poll), and after `timeout_ms` compares each member's
//!   answers with the count before the round. `fall` failures in a row take
//!   a member out of new-connection selection ([`crate::lb4::Vip::pick`]
//!   skips it: only its connections move), `rise` successes bring it back.
//!   Verdicts are kept by member (load balancer, address, port) across
//!   applies and written into every new table.
//!
//! # Assumptions / not yet
//!
//! Untagged switches; a member is probed only while its MAC is known (bound port or
//! a learned neighbor), else the round counts as a failure.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::conntrack::tcp::{ACK, RST, SYN};
use crate::counters::Outcome;
use crate::lb4::ProbeKind;
use crate::packet::checksum::{accumulate, finish, internet_checksum, pseudo};
use crate::packet::headers::{
    Mac, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};
use crate::packet::parse::{Ipv4Info, Parsed, L4};
use crate::pipeline::{Decision, Tracer, Verdict};
use crate::tables::Tables;

/// Source ports of probes: one per member slot (16384 slots fill the range).
pub const PROBE_PORT_BASE: u16 = 49152;

/// Length of a probe frame: Ethernet, IPv4 and TCP headers without options.
pub const PROBE_LEN: usize = 14 + 20 + 20;

/// The probe source port of member `slot`.
pub fn probe_port(slot: u32) -> Option<u16> {
    u16::try_from(slot)
        .ok()
        .and_then(|s| PROBE_PORT_BASE.checked_add(s))
}

/// Writes the probe (a SYN, or an echo request identified by `sport`)
/// into `buf`; returns its length.
#[allow(clippy::too_many_arguments)]
pub fn build_probe(
    buf: &mut [u8; PROBE_LEN],
    kind: ProbeKind,
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
) -> usize {
    buf.fill(0);
    buf[0..6].copy_from_slice(&dst_mac);
    buf[6..12].copy_from_slice(&src_mac);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let (proto, l4_len) = match kind {
        ProbeKind::Tcp => (IPPROTO_TCP, 20u16),
        ProbeKind::Ping => (IPPROTO_ICMP, 8u16),
        ProbeKind::UdpConnect => (IPPROTO_UDP, 8u16),
    };
    let ip = &mut buf[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + l4_len).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = internet_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    if kind == ProbeKind::Ping {
        let icmp = &mut buf[34..42];
        icmp[0] = ICMP_ECHO_REQUEST;
        icmp[4..6].copy_from_slice(&sport.to_be_bytes());
        icmp[6..8].copy_from_slice(&seq.to_be_bytes()[2..4]);
        let sum = internet_checksum(icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        return 42;
    }
    if kind == ProbeKind::UdpConnect {
        let udp = &mut buf[34..42];
        udp[0..2].copy_from_slice(&sport.to_be_bytes());
        udp[2..4].copy_from_slice(&dport.to_be_bytes());
        udp[4..6].copy_from_slice(&8u16.to_be_bytes());
        let sum = l4_checksum(IPPROTO_UDP, src, dst, udp);
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        return 42;
    }
    let tcp = &mut buf[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = l4_checksum(IPPROTO_TCP, src, dst, tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    PROBE_LEN
}

fn l4_checksum(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let sum = pseudo(&src.octets(), &dst.octets(), proto, segment.len());
    match finish(accumulate(sum, segment)) {
        // A zero UDP checksum means "none": sent as all ones (RFC 768).
        0 if proto == IPPROTO_UDP => 0xffff,
        c => c,
    }
}

/// A member's answer to a probe, addressed to the router (`ip.dst` is one
/// of its addresses): counted and, for a SYN-ACK, answered with a RST in
/// place. `None`: not a probe answer.
// hot path (packets to the router's own addresses only): a range check.
pub fn take_answer<T: Tracer>(
    t: &Tables,
    p: &Parsed,
    ip: &Ipv4Info,
    buf: &mut [u8],
    len: &mut usize,
    tr: &mut T,
) -> Option<Decision> {
    let lb = &t.stateful.lb;
    if p.l4
        == (L4::Icmp {
            ty: ICMP_ECHO_REPLY,
            code: 0,
        })
    {
        let at = p.l4_offset + 4;
        let id = u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]);
        let slot = usize::from(id.checked_sub(PROBE_PORT_BASE)?);
        let (_, member_ip, _) = lb.names.get(slot)?;
        if *member_ip != ip.src {
            return None;
        }
        if let Some(c) = lb.probes_answered.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        tr.note("lb_probe", || {
            format!("{member_ip} answered the ping probe")
        });
        return Some(Decision {
            verdict: Verdict::Consumed,
            outcome: Some(Outcome::LbProbeAnswered),
            learned: false,
        });
    }
    if p.l4
        == (L4::Icmp {
            ty: ICMP_DEST_UNREACHABLE,
            code: ICMP_PORT_UNREACHABLE,
        })
    {
        return refused_datagram(lb, p, ip, buf, tr);
    }
    if let L4::Udp { sport, dport } = p.l4 {
        let slot = usize::from(dport.checked_sub(PROBE_PORT_BASE)?);
        let (_, member_ip, member_port) = lb.names.get(slot)?;
        if *member_ip != ip.src || *member_port != sport {
            return None;
        }
        if let Some(c) = lb.probes_answered.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        tr.note("lb_probe", || {
            format!("{member_ip}:{member_port} answered the datagram probe")
        });
        return Some(Decision {
            verdict: Verdict::Consumed,
            outcome: Some(Outcome::LbProbeAnswered),
            learned: false,
        });
    }
    let L4::Tcp {
        sport,
        dport,
        flags,
    } = p.l4
    else {
        return None;
    };
    let slot = usize::from(dport.checked_sub(PROBE_PORT_BASE)?);
    let (_, member_ip, member_port) = lb.names.get(slot)?;
    if *member_ip != ip.src || *member_port != sport {
        return None;
    }
    if flags & RST != 0 {
        if let Some(c) = lb.probes_refused.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        tr.note("lb_probe", || {
            format!("{member_ip}:{member_port} refused the probe (RST)")
        });
        return Some(Decision {
            verdict: Verdict::Consumed,
            outcome: Some(Outcome::LbProbeRefused),
            learned: false,
        });
    }
    if flags & (SYN | ACK) != SYN | ACK {
        return None;
    }
    if let Some(c) = lb.probes_answered.get(slot) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    tr.note("lb_probe", || {
        format!("{member_ip}:{member_port} answered the probe: RST back")
    });
    if !rst_in_place(buf, len, p) {
        return Some(Decision {
            verdict: Verdict::Consumed,
            outcome: Some(Outcome::LbProbeAnswered),
            learned: false,
        });
    }
    Some(Decision {
        verdict: Verdict::Reply,
        outcome: Some(Outcome::LbProbeAnswered),
        learned: false,
    })
}

const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_PORT_UNREACHABLE: u8 = 3;

/// An ICMP port unreachable from a member quoting a datagram probe: counted
/// as refused.
fn refused_datagram<T: Tracer>(
    lb: &crate::lb4::Lb4Tables,
    p: &Parsed,
    ip: &Ipv4Info,
    buf: &[u8],
    tr: &mut T,
) -> Option<Decision> {
    // The quoted IPv4 header follows the 8-byte ICMP header.
    let q = p.l4_offset + 8;
    let ihl = usize::from(*buf.get(q)? & 0x0f) * 4;
    if *buf.get(q + 9)? != IPPROTO_UDP || ihl < 20 {
        return None;
    }
    let quoted_dst = Ipv4Addr::new(
        *buf.get(q + 16)?,
        *buf.get(q + 17)?,
        *buf.get(q + 18)?,
        *buf.get(q + 19)?,
    );
    let sport = u16::from_be_bytes([*buf.get(q + ihl)?, *buf.get(q + ihl + 1)?]);
    let slot = usize::from(sport.checked_sub(PROBE_PORT_BASE)?);
    let (_, member_ip, member_port) = lb.names.get(slot)?;
    if *member_ip != ip.src || *member_ip != quoted_dst {
        return None;
    }
    if let Some(c) = lb.probes_refused.get(slot) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    tr.note("lb_probe", || {
        format!("{member_ip}:{member_port} refused the datagram probe (port unreachable)")
    });
    Some(Decision {
        verdict: Verdict::Consumed,
        outcome: Some(Outcome::LbProbeRefused),
        learned: false,
    })
}

/// Turns a SYN-ACK into the RST that closes it (addresses, ports and MACs
/// swapped, sequence = the SYN-ACK's acknowledgement, no payload/options).
fn rst_in_place(buf: &mut [u8], len: &mut usize, p: &Parsed) -> bool {
    let (l3, l4) = (p.l3_offset, p.l4_offset);
    let end = l4 + 20;
    if l3 != 14 || l4 != l3 + 20 || buf.len() < end || *len < end {
        return false;
    }
    let (Some(ack), Ok(src), Ok(dst)) = (
        buf.get(l4 + 8..l4 + 12)
            .and_then(|b| <[u8; 4]>::try_from(b).ok()),
        <[u8; 4]>::try_from(&buf[l3 + 12..l3 + 16]),
        <[u8; 4]>::try_from(&buf[l3 + 16..l3 + 20]),
    ) else {
        return false;
    };
    let (smac, dmac) = (p.src, p.dst);
    buf[0..6].copy_from_slice(&smac);
    buf[6..12].copy_from_slice(&dmac);
    buf[l3 + 2..l3 + 4].copy_from_slice(&40u16.to_be_bytes());
    buf[l3 + 8] = 64;
    buf[l3 + 10..l3 + 12].fill(0);
    buf[l3 + 12..l3 + 16].copy_from_slice(&dst);
    buf[l3 + 16..l3 + 20].copy_from_slice(&src);
    let sum = internet_checksum(&buf[l3..l3 + 20]);
    buf[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
    let ports: [u8; 4] = [buf[l4 + 2], buf[l4 + 3], buf[l4], buf[l4 + 1]];
    let tcp = &mut buf[l4..end];
    tcp[0..4].copy_from_slice(&ports);
    tcp[4..8].copy_from_slice(&ack);
    tcp[8..12].fill(0);
    tcp[12] = 0x50;
    tcp[13] = RST;
    tcp[14..20].fill(0);
    let sum = l4_checksum(IPPROTO_TCP, Ipv4Addr::from(dst), Ipv4Addr::from(src), tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    *len = end;
    true
}

/// A member's verdict and its current streak.
#[derive(Debug, Clone, Copy)]
struct Verdicts {
    up: bool,
    successes: u8,
    failures: u8,
}

/// A load balancer's round in flight.
struct Round {
    generation: u64,
    next: Instant,
    /// When the round in flight is judged, with each target's answers and
    /// refusals before it.
    judge: Option<(Instant, Vec<(u64, u64)>)>,
}

/// How often the monitor thread looks at its rounds.
const TICK: Duration = Duration::from_millis(50);

/// Runs the monitors of the tables `tables` publishes until `stop`.
pub fn run(tables: Arc<ArcSwap<Tables>>, stop: Arc<AtomicBool>) {
    let mut verdicts: HashMap<(Arc<str>, Ipv4Addr, u16), Verdicts> = HashMap::new();
    let mut rounds: HashMap<Arc<str>, Round> = HashMap::new();
    let mut generation = 0;
    while !stop.load(Ordering::Relaxed) {
        let t = tables.load_full();
        if t.generation != generation {
            generation = t.generation;
            restore(&t, &mut verdicts);
            rounds.retain(|name, _| t.stateful.lb.monitors.iter().any(|m| &m.name == name));
        }
        tick(&t, Instant::now(), &mut rounds, &mut verdicts);
        std::thread::sleep(TICK);
    }
}

/// Writes the verdicts kept by member into freshly compiled tables (and
/// forgets members that are gone).
fn restore(t: &Tables, verdicts: &mut HashMap<(Arc<str>, Ipv4Addr, u16), Verdicts>) {
    let lb = &t.stateful.lb;
    let mut kept = HashMap::with_capacity(verdicts.len());
    for m in lb.monitors.iter() {
        for target in &m.targets {
            let key = (m.name.clone(), target.ip, target.port);
            if let Some(v) = verdicts.get(&key) {
                if let Some(up) = lb.up.get(target.slot as usize) {
                    up.store(v.up, Ordering::Relaxed);
                }
                kept.insert(key, *v);
            }
        }
    }
    *verdicts = kept;
}

/// Starts the rounds that are due and judges those whose time is up.
fn tick(
    t: &Tables,
    now: Instant,
    rounds: &mut HashMap<Arc<str>, Round>,
    verdicts: &mut HashMap<(Arc<str>, Ipv4Addr, u16), Verdicts>,
) {
    let lb = &t.stateful.lb;
    let counts = |slot: u32| {
        let load = |v: &[std::sync::atomic::AtomicU64]| {
            v.get(slot as usize)
                .map_or(0, |c| c.load(Ordering::Relaxed))
        };
        (load(&lb.probes_answered), load(&lb.probes_refused))
    };
    for m in lb.monitors.iter() {
        let round = rounds.entry(m.name.clone()).or_insert(Round {
            generation: t.generation,
            next: now,
            judge: None,
        });
        if round.generation != t.generation {
            // Counters of other tables: that round is void.
            round.generation = t.generation;
            round.judge = None;
        }
        if let Some((at, before)) = &round.judge {
            if now < *at {
                continue;
            }
            for (target, before) in m.targets.iter().zip(before) {
                let (answered, refused) = counts(target.slot);
                let ok = match m.spec.kind {
                    ProbeKind::UdpConnect => refused == before.1,
                    _ => answered > before.0,
                };
                let key = (m.name.clone(), target.ip, target.port);
                let v = verdicts.entry(key).or_insert(Verdicts {
                    up: true,
                    successes: 0,
                    failures: 0,
                });
                if judge(v, ok, m.spec.rise, m.spec.fall) {
                    tracing::info!(
                        load_balancer = %m.name, member = %format!("{}:{}", target.ip, target.port),
                        up = v.up, "load balancer member health changed"
                    );
                }
                if let Some(up) = lb.up.get(target.slot as usize) {
                    up.store(v.up, Ordering::Relaxed);
                }
            }
            round.judge = None;
        }
        if now >= round.next {
            let before = m.targets.iter().map(|t| counts(t.slot)).collect();
            round.judge = Some((
                now + Duration::from_millis(u64::from(m.spec.timeout_ms)),
                before,
            ));
            round.next = now + Duration::from_millis(u64::from(m.spec.interval_ms));
            m.round.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Adds a probe's result to `v`; true when the member changed sides.
fn judge(v: &mut Verdicts, ok: bool, rise: u8, fall: u8) -> bool {
    if ok {
        v.failures = 0;
        v.successes = v.successes.saturating_add(1);
        if !v.up && v.successes >= rise {
            v.up = true;
            return true;
        }
    } else {
        v.successes = 0;
        v.failures = v.failures.saturating_add(1);
        if v.up && v.failures >= fall {
            v.up = false;
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_streaks() {
        let mut v = Verdicts {
            up: true,
            successes: 0,
            failures: 0,
        };
        assert!(!judge(&mut v, false, 2, 3));
        assert!(!judge(&mut v, false, 2, 3));
        assert!(!judge(&mut v, true, 2, 3), "a success breaks the streak");
        assert!(!judge(&mut v, false, 2, 3));
        assert!(!judge(&mut v, false, 2, 3));
        assert!(judge(&mut v, false, 2, 3));
        assert!(!v.up);
        assert!(!judge(&mut v, true, 2, 3));
        assert!(judge(&mut v, true, 2, 3));
        assert!(v.up);
    }

    #[test]
    fn probe_ports_name_slots() {
        assert_eq!(probe_port(0), Some(PROBE_PORT_BASE));
        assert_eq!(probe_port(16_383), Some(65_535));
        assert_eq!(probe_port(16_384), None);
    }
}
