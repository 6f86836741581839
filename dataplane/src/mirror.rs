//! Traffic mirroring: copies of the frames a logical port sends and/or
//! receives, optionally filtered by protocol and CIDR, sent to a local port
//! or to a remote collector in GRE / ERSPAN type II.
//!
//! # Design
//!
//! - Mirroring happens in the engine, around the pipeline, so copies are
//!   byte-identical to what the VM put on the wire ("out", taken before the
//!   pipeline rewrites anything) and to what is delivered to it ("in", taken
//!   as the frame is queued for the port's interface). The original frame's
//!   forwarding is untouched: the copy goes to another transmit queue.
//!   "Out" copies are taken before any stage, so frames the pipeline then
//!   drops (port security, groups, meters) are mirrored too: they are what
//!   the VM sent.
//! - Sessions are compiled into the tables ([`MirrorTables`]): per interface,
//!   the sessions whose sources send or receive there. A port with a bound
//!   MAC is told apart on a shared interface by the frame's source ("out") or
//!   destination ("in", group addresses included) MAC.
//! - ERSPAN type II (GRE protocol 0x88BE with sequence numbers, 8-byte ERSPAN
//!   header carrying the 10-bit session ID) is what tcpdump and Wireshark
//!   decode. The outer Ethernet/IPv4 header comes from the configuration
//!   (the collector's MAC is given, not resolved) and is filled in per copy
//!   on the stack: length, ID, checksum, GRE sequence. Overhead: 50 bytes, so
//!   the collector's link needs an MTU of at least 1550 for full-size frames.
//! - Counters: mirrored frames and bytes per session, counted by the worker
//!   and folded once per round like the meters ([`crate::qos`]); copies that
//!   did not fit a buffer are counted as `truncated`.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::lpm::Prefix;
use crate::packet::checksum::internet_checksum;
use crate::packet::headers::{is_group, parse_mac, Mac};
use crate::packet::parse::{parse, L3};

/// Most mirror sessions.
pub const MAX_SESSIONS: usize = 64;
/// Bytes ERSPAN II adds: Ethernet 14 + IPv4 20 + GRE with sequence 8 + ERSPAN 8.
pub const ERSPAN_OVERHEAD: usize = 50;
const GRE_PROTO_ERSPAN2: u16 = 0x88be;
const IPPROTO_GRE: u8 = 47;

/// Which of a source port's frames are mirrored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorDirection {
    /// Frames delivered to the port.
    In,
    /// Frames the port sends.
    Out,
    #[default]
    Both,
}

/// Only frames matching every given field are mirrored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorFilter {
    /// `tcp`, `udp`, `icmp` or an IP protocol number.
    #[serde(default)]
    pub protocol: Option<String>,
    /// IPv4 `a.b.c.d/len`: the source or the destination is inside.
    #[serde(default)]
    pub cidr: Option<String>,
}

/// Where copies go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum MirrorTarget {
    /// Out of a local logical port's interface, unchanged.
    Port { port: String },
    /// GRE / ERSPAN type II to a remote collector, out of a data-plane interface.
    Erspan {
        interface: String,
        src_mac: String,
        dst_mac: String,
        src_ip: String,
        dst_ip: String,
        /// 0..=1023.
        session_id: u16,
    },
}

/// A mirror session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    pub name: String,
    /// Source logical ports.
    pub ports: Vec<String>,
    #[serde(default)]
    pub direction: MirrorDirection,
    #[serde(default)]
    pub filter: Option<MirrorFilter>,
    pub target: MirrorTarget,
}

/// Why a mirror configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("Mirror {name:?}: duplicate session name")]
    DuplicateName { name: String },
    #[error("Mirror {name:?}: no source ports")]
    NoSources { name: String },
    #[error("Mirror {name:?}: unknown port {port:?}")]
    UnknownPort { name: String, port: String },
    #[error("Mirror {name:?}: unknown interface {interface:?}")]
    UnknownInterface { name: String, interface: String },
    #[error("Mirror {name:?}: target port {port:?} is also a source (copies would loop)")]
    TargetIsSource { name: String, port: String },
    #[error("Mirror {name:?}: bad {field} {value:?}")]
    BadField {
        name: String,
        field: &'static str,
        value: String,
    },
    #[error("Mirror {name:?}: ERSPAN session ID {session_id} outside 0..=1023")]
    BadSessionId { name: String, session_id: u16 },
    #[error("More than {MAX_SESSIONS} mirror sessions")]
    TooMany,
}

/// Where a compiled session sends copies.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Port(u16),
    Erspan {
        port: u16,
        /// Outer Ethernet + IPv4 + GRE + ERSPAN with per-copy fields zero.
        template: [u8; ERSPAN_OVERHEAD],
    },
}

/// A compiled session.
#[derive(Debug)]
pub struct Session {
    pub name: String,
    pub target: Target,
    pub proto: Option<u8>,
    pub cidr: Option<Prefix>,
    pub mirrored_packets: AtomicU64,
    pub mirrored_bytes: AtomicU64,
    pub truncated: AtomicU64,
}

/// One source of a session on an interface.
#[derive(Debug, Clone, Copy)]
pub struct Tap {
    pub session: u16,
    /// The port's bound MAC (frames of other ports on the interface are skipped).
    pub mac: Option<Mac>,
}

/// The compiled sessions, part of [`crate::tables::Tables`].
#[derive(Debug, Default)]
pub struct MirrorTables {
    /// Per interface: taps on frames received from it (the port sends).
    pub rx: Vec<Vec<Tap>>,
    /// Per interface: taps on frames sent to it (delivered to the port).
    pub tx: Vec<Vec<Tap>>,
    pub sessions: Vec<Session>,
}

impl Clone for MirrorTables {
    fn clone(&self) -> Self {
        MirrorTables {
            rx: self.rx.clone(),
            tx: self.tx.clone(),
            sessions: self
                .sessions
                .iter()
                .map(|s| Session {
                    name: s.name.clone(),
                    target: s.target,
                    proto: s.proto,
                    cidr: s.cidr,
                    mirrored_packets: AtomicU64::new(0),
                    mirrored_bytes: AtomicU64::new(0),
                    truncated: AtomicU64::new(0),
                })
                .collect(),
        }
    }
}

fn protocol_number(p: &str) -> Option<u8> {
    match p {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        n => n.parse().ok(),
    }
}

/// Validates the sessions and compiles them. `lports` gives each logical
/// port's (name, interface, bound MAC).
pub fn compile(
    specs: &[MirrorSpec],
    lports: &[(&str, u16, Option<Mac>)],
    interfaces: &[String],
) -> Result<MirrorTables, MirrorError> {
    if specs.is_empty() {
        return Ok(MirrorTables::default());
    }
    if specs.len() > MAX_SESSIONS {
        return Err(MirrorError::TooMany);
    }
    let mut t = MirrorTables {
        rx: vec![Vec::new(); interfaces.len()],
        tx: vec![Vec::new(); interfaces.len()],
        sessions: Vec::new(),
    };
    let mut names = std::collections::HashSet::new();
    for (sid, s) in specs.iter().enumerate() {
        let name = || s.name.clone();
        if !names.insert(s.name.as_str()) {
            return Err(MirrorError::DuplicateName { name: name() });
        }
        if s.ports.is_empty() {
            return Err(MirrorError::NoSources { name: name() });
        }
        let bad = |field, value: &str| MirrorError::BadField {
            name: name(),
            field,
            value: value.to_string(),
        };
        let find =
            |port: &str| {
                lports.iter().find(|l| l.0 == port).copied().ok_or_else(|| {
                    MirrorError::UnknownPort {
                        name: name(),
                        port: port.to_string(),
                    }
                })
            };
        let filter = s.filter.clone().unwrap_or_default();
        let proto = filter
            .protocol
            .as_deref()
            .map(|p| protocol_number(p).ok_or_else(|| bad("protocol", p)))
            .transpose()?;
        let cidr = filter
            .cidr
            .as_deref()
            .map(|c| c.parse::<Prefix>().map_err(|()| bad("cidr", c)))
            .transpose()?;
        let target = match &s.target {
            MirrorTarget::Port { port } => {
                if s.ports.contains(port) {
                    return Err(MirrorError::TargetIsSource {
                        name: name(),
                        port: port.clone(),
                    });
                }
                Target::Port(find(port)?.1)
            }
            MirrorTarget::Erspan {
                interface,
                src_mac,
                dst_mac,
                src_ip,
                dst_ip,
                session_id,
            } => {
                let port = interfaces
                    .iter()
                    .position(|i| i == interface)
                    .and_then(|i| u16::try_from(i).ok())
                    .ok_or_else(|| MirrorError::UnknownInterface {
                        name: name(),
                        interface: interface.clone(),
                    })?;
                let mac = |field, v: &str| {
                    parse_mac(v)
                        .filter(|m| !is_group(m))
                        .ok_or_else(|| bad(field, v))
                };
                let ip = |field, v: &str| v.parse::<Ipv4Addr>().map_err(|_| bad(field, v));
                if *session_id > 1023 {
                    return Err(MirrorError::BadSessionId {
                        name: name(),
                        session_id: *session_id,
                    });
                }
                Target::Erspan {
                    port,
                    template: erspan_template(
                        mac("src_mac", src_mac)?,
                        mac("dst_mac", dst_mac)?,
                        ip("src_ip", src_ip)?,
                        ip("dst_ip", dst_ip)?,
                        *session_id,
                    ),
                }
            }
        };
        let session = u16::try_from(sid).map_err(|_| MirrorError::TooMany)?;
        for p in &s.ports {
            let (_, iface, mac) = find(p)?;
            let tap = Tap { session, mac };
            let i = usize::from(iface);
            if s.direction != MirrorDirection::In {
                if let Some(v) = t.rx.get_mut(i) {
                    v.push(tap);
                }
            }
            if s.direction != MirrorDirection::Out {
                if let Some(v) = t.tx.get_mut(i) {
                    v.push(tap);
                }
            }
        }
        t.sessions.push(Session {
            name: s.name.clone(),
            target,
            proto,
            cidr,
            mirrored_packets: AtomicU64::new(0),
            mirrored_bytes: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
        });
    }
    Ok(t)
}

fn erspan_template(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    session_id: u16,
) -> [u8; ERSPAN_OVERHEAD] {
    let mut h = [0u8; ERSPAN_OVERHEAD];
    h[0..6].copy_from_slice(&dst_mac);
    h[6..12].copy_from_slice(&src_mac);
    h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: version 4, IHL 5, TTL 64, protocol GRE; length/ID/checksum per copy.
    h[14] = 0x45;
    h[22] = 64;
    h[23] = IPPROTO_GRE;
    h[26..30].copy_from_slice(&src.octets());
    h[30..34].copy_from_slice(&dst.octets());
    // GRE: S (sequence number present), version 0, protocol ERSPAN type II.
    h[34..36].copy_from_slice(&0x1000u16.to_be_bytes());
    h[36..38].copy_from_slice(&GRE_PROTO_ERSPAN2.to_be_bytes());
    // ERSPAN II: version 1, VLAN 0 | COS 0, En (set per copy), T 0, session ID | index 0.
    h[42] = 0x10;
    h[44..46].copy_from_slice(&(session_id & 0x3ff).to_be_bytes());
    h
}

/// Fills the per-copy fields of an ERSPAN header for a `frame_len`-byte
/// frame; `tagged` sets En = 3 (the original VLAN tag is kept in the frame).
// hot path (mirrored frames): a 20-byte checksum.
pub fn erspan_header(
    template: &[u8; ERSPAN_OVERHEAD],
    frame_len: usize,
    seq: u32,
    tagged: bool,
) -> [u8; ERSPAN_OVERHEAD] {
    let mut h = *template;
    let total = u16::try_from(frame_len + ERSPAN_OVERHEAD - 14).unwrap_or(u16::MAX);
    h[16..18].copy_from_slice(&total.to_be_bytes());
    h[18..20].copy_from_slice(&seq.to_be_bytes()[2..4]);
    let c = internet_checksum(&h[14..34]);
    h[24..26].copy_from_slice(&c.to_be_bytes());
    h[38..42].copy_from_slice(&seq.to_be_bytes());
    if tagged {
        h[44] |= 0x18;
    }
    h
}

impl MirrorTables {
    /// Whether a frame on this tap is mirrored: the port's MAC (source when
    /// `out`, destination — or a group address — when delivered) and the filter.
    // hot path (interfaces with taps only): a MAC compare, a parse when filtered.
    pub fn selects(&self, tap: &Tap, frame: &[u8], out: bool) -> Option<&Session> {
        if let Some(mac) = tap.mac {
            let at = if out { 6 } else { 0 };
            let m = frame.get(at..at + 6)?;
            let group = !out && m.first().is_some_and(|b| b & 1 == 1);
            if m != mac && !group {
                return None;
            }
        }
        let s = self.sessions.get(usize::from(tap.session))?;
        if s.proto.is_none() && s.cidr.is_none() {
            return Some(s);
        }
        let p = parse(frame).ok()?;
        let L3::Ipv4(ip) = p.l3 else { return None };
        if s.proto.is_some_and(|pr| pr != ip.proto) {
            return None;
        }
        if s.cidr
            .is_some_and(|c| !c.contains(ip.src) && !c.contains(ip.dst))
        {
            return None;
        }
        Some(s)
    }

    /// Per-session counters: (name, packets, bytes, truncated).
    pub fn stats(&self) -> Vec<MirrorStats> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.sessions
            .iter()
            .map(|s| MirrorStats {
                session: s.name.clone(),
                mirrored_packets: get(&s.mirrored_packets),
                mirrored_bytes: get(&s.mirrored_bytes),
                truncated: get(&s.truncated),
            })
            .collect()
    }
}

/// Counters of one session, as reported by `{"op":"mirror_stats"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStats {
    pub session: String,
    pub mirrored_packets: u64,
    pub mirrored_bytes: u64,
    pub truncated: u64,
}

/// A worker's per-session sequence numbers and counts (folded once per round).
pub struct MirrorState {
    generation: u64,
    pub seq: [u32; MAX_SESSIONS],
    packets: [u64; MAX_SESSIONS],
    bytes: [u64; MAX_SESSIONS],
    truncated: [u64; MAX_SESSIONS],
}

impl Default for MirrorState {
    fn default() -> Self {
        MirrorState {
            generation: u64::MAX,
            seq: [0; MAX_SESSIONS],
            packets: [0; MAX_SESSIONS],
            bytes: [0; MAX_SESSIONS],
            truncated: [0; MAX_SESSIONS],
        }
    }
}

impl MirrorState {
    /// Starts counting for a new generation (sequence numbers restart).
    pub fn sync(&mut self, generation: u64) {
        if self.generation != generation {
            *self = MirrorState {
                generation,
                ..MirrorState::default()
            };
        }
    }

    /// The next ERSPAN sequence number of session `s`.
    pub fn next_seq(&mut self, s: u16) -> u32 {
        match self.seq.get_mut(usize::from(s)) {
            Some(q) => {
                *q = q.wrapping_add(1);
                *q
            }
            None => 0,
        }
    }

    /// Counts one copy of session `s`.
    pub fn count(&mut self, s: u16, bytes: usize, ok: bool) {
        let i = usize::from(s);
        if ok {
            if let Some(p) = self.packets.get_mut(i) {
                *p += 1;
            }
            if let Some(b) = self.bytes.get_mut(i) {
                *b += bytes as u64;
            }
        } else if let Some(t) = self.truncated.get_mut(i) {
            *t += 1;
        }
    }

    /// Adds and zeroes the counts into the tables' counters.
    pub fn fold(&mut self, t: &MirrorTables) {
        for (i, s) in t.sessions.iter().enumerate() {
            for (shared, local) in [
                (&s.mirrored_packets, self.packets.get_mut(i)),
                (&s.mirrored_bytes, self.bytes.get_mut(i)),
                (&s.truncated, self.truncated.get_mut(i)),
            ] {
                if let Some(l) = local.filter(|l| **l != 0) {
                    shared.fetch_add(*l, Ordering::Relaxed);
                    *l = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile as compile_all, ConfigError};
    use crate::testutil::{interfaces, topology};

    fn spec(target: MirrorTarget) -> MirrorSpec {
        MirrorSpec {
            name: "m".into(),
            ports: vec!["vm1".into()],
            direction: MirrorDirection::Out,
            filter: None,
            target,
        }
    }

    fn erspan(session_id: u16, dst_ip: &str) -> MirrorTarget {
        MirrorTarget::Erspan {
            interface: "up".into(),
            src_mac: "02:00:00:00:00:fe".into(),
            dst_mac: "02:00:00:00:00:fd".into(),
            src_ip: "198.18.0.1".into(),
            dst_ip: dst_ip.into(),
            session_id,
        }
    }

    fn try_compile(m: Vec<MirrorSpec>) -> Result<crate::tables::Tables, ConfigError> {
        let mut s = topology();
        s.mirrors = m;
        compile_all(&s, &interfaces(), 1)
    }

    #[test]
    fn bad_sessions_are_rejected_precisely() {
        let e = try_compile(vec![spec(erspan(1024, "198.18.0.2"))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Mirror \"m\": ERSPAN session ID 1024 outside 0..=1023"
        );
        let e = try_compile(vec![spec(erspan(1, "fd00::1"))]).unwrap_err();
        assert_eq!(e.to_string(), "Mirror \"m\": bad dst_ip \"fd00::1\"");
        let mut s = spec(MirrorTarget::Port { port: "vm2".into() });
        s.filter = Some(MirrorFilter {
            protocol: Some("tcp".into()),
            cidr: Some("10.0.0.1/8".into()),
        });
        let e = try_compile(vec![s]).unwrap_err();
        assert_eq!(e.to_string(), "Mirror \"m\": bad cidr \"10.0.0.1/8\"");
        let e = try_compile(vec![spec(MirrorTarget::Port { port: "vm1".into() })]).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Mirror(MirrorError::TargetIsSource { .. })
        ));
        let mut s = spec(MirrorTarget::Port { port: "vm2".into() });
        s.ports = vec!["ghost".into()];
        assert!(matches!(
            try_compile(vec![s]).unwrap_err(),
            ConfigError::Mirror(MirrorError::UnknownPort { .. })
        ));
    }

    #[test]
    fn taps_follow_direction_and_filter() {
        let mut s = spec(MirrorTarget::Port { port: "vm2".into() });
        s.filter = Some(MirrorFilter {
            protocol: Some("icmp".into()),
            cidr: None,
        });
        let t = try_compile(vec![s]).unwrap();
        // Out only: a tap on vm1's receive side (p0), none on its transmit side.
        assert_eq!(t.mirror.rx[0].len(), 1);
        assert!(t.mirror.tx[0].is_empty());
        let ping = crate::packet::build::icmp_echo(
            [2, 0, 0, 0, 0, 2],
            [2, 0, 0, 0, 0, 1],
            "10.0.1.10".parse().unwrap(),
            "10.0.1.11".parse().unwrap(),
            64,
            b"x",
        );
        let udp = crate::packet::build::udp64(
            [2, 0, 0, 0, 0, 2],
            [2, 0, 0, 0, 0, 1],
            "10.0.1.10".parse().unwrap(),
            "10.0.1.11".parse().unwrap(),
        );
        let tap = t.mirror.rx[0][0];
        assert!(t.mirror.selects(&tap, &ping, true).is_some());
        assert!(t.mirror.selects(&tap, &udp, true).is_none(), "filtered");
        let mut spoofed = ping.clone();
        spoofed[11] = 9;
        assert!(
            t.mirror.selects(&tap, &spoofed, true).is_none(),
            "other MAC"
        );
    }

    #[test]
    fn erspan_header_is_valid_ipv4_gre() {
        let h = erspan_template(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            7,
        );
        let h = erspan_header(&h, 100, 5, false);
        assert_eq!(internet_checksum(&h[14..34]), 0);
        assert_eq!(u16::from_be_bytes([h[16], h[17]]), 136);
        assert_eq!(&h[38..42], &5u32.to_be_bytes());
        assert_eq!(h[42] >> 4, 1);
        assert_eq!(u16::from_be_bytes([h[44], h[45]]), 7);
    }
}
