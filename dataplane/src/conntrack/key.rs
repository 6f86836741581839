//! Connection keys and their extraction from a parsed frame.
//!
//! ICMP echo request/reply use the identifier as both "ports", so a reply
//! (addresses swapped) finds the request's connection. ICMP errors carry the
//! tuple of the packet they quote in [`Extracted::related`]. Non-first
//! fragments have no transport header and are not tracked (no reassembly).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::packet::headers::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::packet::parse::{L3, L4};
use crate::packet::Parsed;

use super::tcp::TcpSeg;

/// A connection tuple in one zone. Addresses are IPv6-sized; IPv4 is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub src: u128,
    pub dst: u128,
    pub zone: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Key {
    /// The all-zero key (unused slots).
    pub const ZERO: Key = Key {
        src: 0,
        dst: 0,
        zone: 0,
        sport: 0,
        dport: 0,
        proto: 0,
    };

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Key {
        Key {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }

    /// The key in another zone.
    pub fn in_zone(&self, zone: u32) -> Key {
        Key { zone, ..*self }
    }
}

const V4_MAPPED: u128 = 0xffff << 32;

/// An IPv4 address as stored in keys (IPv4-mapped IPv6).
pub fn v4(octets: [u8; 4]) -> u128 {
    V4_MAPPED | u128::from(u32::from_be_bytes(octets))
}

/// [`v4`] of an `Ipv4Addr`.
pub fn from_v4(a: Ipv4Addr) -> u128 {
    v4(a.octets())
}

/// The IPv4 address of a mapped key address.
pub fn to_v4(a: u128) -> Option<Ipv4Addr> {
    (a >> 32 == 0xffff).then(|| Ipv4Addr::from(u32::try_from(a & 0xffff_ffff).unwrap_or(0)))
}

/// A key address for display.
pub fn show(a: u128) -> String {
    match to_v4(a) {
        Some(v4) => v4.to_string(),
        None => Ipv6Addr::from(a).to_string(),
    }
}

/// What the tracking and filtering stages need from one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    /// Tuple in zone 0; stages put it in their zone.
    pub key: Key,
    pub v6: bool,
    /// ICMP type and code (ICMP and ICMPv6).
    pub icmp: Option<(u8, u8)>,
    pub tcp: Option<TcpSeg>,
    /// For an ICMP error: the tuple of the packet it quotes, as that packet
    /// travelled (its connection is what the error relates to).
    pub related: Option<Key>,
}

fn get<const N: usize>(frame: &[u8], off: usize) -> Option<[u8; N]> {
    frame
        .get(off..off.checked_add(N)?)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
}

fn be16(frame: &[u8], off: usize) -> Option<u16> {
    get::<2>(frame, off).map(u16::from_be_bytes)
}

fn is_echo(v6: bool, ty: u8) -> bool {
    if v6 {
        ty == 128 || ty == 129
    } else {
        ty == 8 || ty == 0
    }
}

fn is_error(v6: bool, ty: u8) -> bool {
    if v6 {
        (1..=4).contains(&ty)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

/// The "ports" of a transport header at `off`: real ports, or the echo
/// identifier twice.
fn ports(frame: &[u8], off: usize, proto: u8, v6: bool) -> Option<(u16, u16)> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => Some((be16(frame, off)?, be16(frame, off + 2)?)),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let ty = *frame.get(off)?;
            if is_echo(v6, ty) {
                let id = be16(frame, off + 4)?;
                Some((id, id))
            } else {
                Some((0, 0))
            }
        }
        _ => Some((0, 0)),
    }
}

/// The quoted packet of an ICMP error whose ICMP header starts at `off`.
fn quoted(frame: &[u8], off: usize, v6: bool) -> Option<Key> {
    let inner = off.checked_add(8)?;
    if v6 {
        let proto = *frame.get(inner + 6)?;
        let src = u128::from_be_bytes(get::<16>(frame, inner + 8)?);
        let dst = u128::from_be_bytes(get::<16>(frame, inner + 24)?);
        let (sport, dport) = ports(frame, inner + 40, proto, true)?;
        Some(Key {
            src,
            dst,
            zone: 0,
            sport,
            dport,
            proto,
        })
    } else {
        let ihl = usize::from(*frame.get(inner)? & 0x0f) * 4;
        let proto = *frame.get(inner + 9)?;
        let src = v4(get::<4>(frame, inner + 12)?);
        let dst = v4(get::<4>(frame, inner + 16)?);
        let (sport, dport) = ports(frame, inner + ihl, proto, false)?;
        Some(Key {
            src,
            dst,
            zone: 0,
            sport,
            dport,
            proto,
        })
    }
}

/// Extracts the tuple and tracking inputs of an IP packet; `None` for
/// non-IP frames and non-first fragments.
// hot path: reads a few header fields, no allocation.
pub fn extract(p: &Parsed, frame: &[u8]) -> Option<Extracted> {
    let (src, dst, proto, v6, l4_len) = match p.l3 {
        L3::Ipv4(ip) if !ip.later_fragment => (
            from_v4(ip.src),
            from_v4(ip.dst),
            ip.proto,
            false,
            ip.total_len.saturating_sub(ip.header_len),
        ),
        L3::Ipv6(ip) => (
            u128::from(ip.src),
            u128::from(ip.dst),
            // The transport behind any extension headers (the parser walked them).
            ip.proto,
            true,
            usize::from(be16(frame, p.l3_offset + 4)?).saturating_sub(ip.ext_len),
        ),
        _ => return None,
    };
    let mut x = Extracted {
        key: Key {
            src,
            dst,
            zone: 0,
            sport: 0,
            dport: 0,
            proto,
        },
        v6,
        icmp: None,
        tcp: None,
        related: None,
    };
    let o = p.l4_offset;
    match p.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => {
            x.key.sport = sport;
            x.key.dport = dport;
            x.tcp = TcpSeg::read(frame, o, flags, l4_len);
        }
        L4::Udp { sport, dport } => {
            x.key.sport = sport;
            x.key.dport = dport;
        }
        L4::Icmp { ty, code } | L4::Icmpv6 { ty, code } => {
            x.icmp = Some((ty, code));
            if is_echo(v6, ty) {
                let id = be16(frame, o + 4)?;
                x.key.sport = id;
                x.key.dport = id;
            } else if is_error(v6, ty) {
                x.related = quoted(frame, o, v6);
            }
        }
        L4::None => {}
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::{icmp_echo, ipv4};
    use crate::packet::parse;

    #[test]
    fn echo_reply_reverses_the_request_key() {
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let b: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let req = icmp_echo([2; 6], [4; 6], a, b, 64, b"x");
        let x = extract(&parse(&req).unwrap(), &req).unwrap();
        assert_eq!(
            (x.key.sport, x.key.dport, x.icmp),
            (0x1234, 0x1234, Some((8, 0)))
        );
        let mut rep = icmp_echo([4; 6], [2; 6], b, a, 64, b"x");
        rep[34] = 0;
        let y = extract(&parse(&rep).unwrap(), &rep).unwrap();
        assert_eq!(y.key, x.key.reversed());
    }

    #[test]
    fn icmp_error_quotes_its_flow() {
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let b: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let udp = ipv4(
            [2; 6],
            [4; 6],
            None,
            a,
            b,
            1,
            17,
            &[0x30, 0x39, 0, 53, 0, 8, 0, 0],
        );
        let mut err = vec![11u8, 0, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&udp[14..42]);
        let f = ipv4(
            [4; 6],
            [2; 6],
            None,
            "10.0.0.254".parse().unwrap(),
            a,
            64,
            1,
            &err,
        );
        let x = extract(&parse(&f).unwrap(), &f).unwrap();
        let q = x.related.unwrap();
        assert_eq!(
            (q.src, q.dst, q.sport, q.dport, q.proto),
            (from_v4(a), from_v4(b), 12345, 53, 17)
        );
    }
}
