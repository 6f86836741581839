//! One pass over a frame's headers into a small `Copy` summary ([`Parsed`]).
//!
//! The summary holds offsets and the few fields the pipeline decides on; the
//! stages that rewrite a packet cast the header at the recorded offset again
//! (mutably). Every failure is a [`ParseError`] that maps 1:1 to a drop reason.

use std::net::{Ipv4Addr, Ipv6Addr};

use zerocopy::FromBytes;

use super::headers::{
    ArpHdr, EthHdr, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Mac, TcpHdr, UdpHdr, VlanTag, ETHERTYPE_ARP,
    ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP,
};

/// Why a frame could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Frame shorter than an Ethernet header")]
    TruncatedEthernet,
    #[error("Frame ends inside the 802.1Q tag")]
    TruncatedVlan,
    #[error("Stacked 802.1Q tags (QinQ) are not supported")]
    StackedVlan,
    #[error("Frame ends inside the ARP header")]
    TruncatedArp,
    #[error("ARP is not IPv4 over Ethernet")]
    UnsupportedArp,
    #[error("Frame ends inside the IPv4 header")]
    TruncatedIpv4,
    #[error("IPv4 version or header length field is invalid")]
    BadIpv4Header,
    #[error("IPv4 total length exceeds the frame or is below the header length")]
    BadIpv4Length,
    #[error("Frame ends inside the IPv6 header")]
    TruncatedIpv6,
    #[error("IPv6 payload length exceeds the frame")]
    BadIpv6Length,
    #[error("Packet ends inside its transport header")]
    TruncatedL4,
    #[error("Packet ends inside an IPv6 extension header")]
    TruncatedIpv6Extension,
    #[error("More IPv6 extension headers than the data plane walks")]
    TooManyIpv6Extensions,
}

/// ARP fields the pipeline decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpInfo {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tpa: Ipv4Addr,
}

/// IPv4 fields the pipeline decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    /// Header length in bytes (20..=60).
    pub header_len: usize,
    /// Total length from the header, checked to fit the frame.
    pub total_len: usize,
    /// A non-first fragment carries no transport header.
    pub later_fragment: bool,
}

/// IPv6 fields the pipeline decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Info {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// The fixed header's next header (an extension header or the transport).
    pub next_header: u8,
    /// The upper-layer protocol behind the extension headers (44 for a
    /// non-first fragment, whose transport header is in the first one).
    pub proto: u8,
    /// Bytes of extension headers between the fixed header and `proto`'s header.
    pub ext_len: usize,
}

/// The network layer of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Arp(ArpInfo),
    Ipv4(Ipv4Info),
    Ipv6(Ipv6Info),
    /// An ethertype this data plane switches but does not look into.
    Other(u16),
}

/// The transport layer, when present and understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    None,
    Icmp { ty: u8, code: u8 },
    Icmpv6 { ty: u8, code: u8 },
    Udp { sport: u16, dport: u16 },
    Tcp { sport: u16, dport: u16, flags: u8 },
}

/// Summary of one frame's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub dst: Mac,
    pub src: Mac,
    /// VLAN ID (12 bits) when the frame carries an 802.1Q tag.
    pub vlan: Option<u16>,
    /// Offset of the network header (14, or 18 with a tag).
    pub l3_offset: usize,
    pub l3: L3,
    /// Offset of the transport header (0 when `l4` is `None`).
    pub l4_offset: usize,
    pub l4: L4,
}

/// Parses a frame. Never panics and never reads past `frame`.
// hot path: called once per packet; no allocation.
pub fn parse(frame: &[u8]) -> Result<Parsed, ParseError> {
    let (eth, rest) = EthHdr::ref_from_prefix(frame).map_err(|_| ParseError::TruncatedEthernet)?;
    let mut ethertype = eth.ethertype.get();
    let mut l3_offset = size_of::<EthHdr>();
    let mut vlan = None;
    let mut payload = rest;
    if ethertype == ETHERTYPE_VLAN {
        let (tag, rest) =
            VlanTag::ref_from_prefix(payload).map_err(|_| ParseError::TruncatedVlan)?;
        vlan = Some(tag.tci.get() & 0x0fff);
        ethertype = tag.ethertype.get();
        if ethertype == ETHERTYPE_VLAN || ethertype == 0x88a8 {
            return Err(ParseError::StackedVlan);
        }
        l3_offset += size_of::<VlanTag>();
        payload = rest;
    }
    let mut parsed = Parsed {
        dst: eth.dst,
        src: eth.src,
        vlan,
        l3_offset,
        l3: L3::Other(ethertype),
        l4_offset: 0,
        l4: L4::None,
    };
    match ethertype {
        ETHERTYPE_ARP => {
            let (arp, _) =
                ArpHdr::ref_from_prefix(payload).map_err(|_| ParseError::TruncatedArp)?;
            if arp.htype.get() != 1
                || arp.ptype.get() != ETHERTYPE_IPV4
                || arp.hlen != 6
                || arp.plen != 4
            {
                return Err(ParseError::UnsupportedArp);
            }
            parsed.l3 = L3::Arp(ArpInfo {
                op: arp.op.get(),
                sha: arp.sha,
                spa: Ipv4Addr::from(arp.spa),
                tpa: Ipv4Addr::from(arp.tpa),
            });
        }
        ETHERTYPE_IPV4 => {
            let (ip, _) =
                Ipv4Hdr::ref_from_prefix(payload).map_err(|_| ParseError::TruncatedIpv4)?;
            let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
            if ip.version_ihl >> 4 != 4 || header_len < size_of::<Ipv4Hdr>() {
                return Err(ParseError::BadIpv4Header);
            }
            let total_len = usize::from(ip.total_len.get());
            if total_len < header_len || total_len > payload.len() {
                return Err(ParseError::BadIpv4Length);
            }
            let frag = ip.frag.get();
            let later_fragment = frag & 0x1fff != 0;
            parsed.l3 = L3::Ipv4(Ipv4Info {
                src: Ipv4Addr::from(ip.src),
                dst: Ipv4Addr::from(ip.dst),
                ttl: ip.ttl,
                proto: ip.proto,
                header_len,
                total_len,
                later_fragment,
            });
            if !later_fragment {
                // Bounded by total_len, not the frame: Ethernet padding is not payload.
                let l4 = payload
                    .get(header_len..total_len)
                    .ok_or(ParseError::BadIpv4Length)?;
                parsed.l4 = parse_l4(ip.proto, l4)?;
                if parsed.l4 != L4::None {
                    parsed.l4_offset = l3_offset + header_len;
                }
            }
        }
        ETHERTYPE_IPV6 => {
            let (ip, rest) =
                Ipv6Hdr::ref_from_prefix(payload).map_err(|_| ParseError::TruncatedIpv6)?;
            let len = usize::from(ip.payload_len.get());
            let l4 = rest.get(..len).ok_or(ParseError::BadIpv6Length)?;
            // Security groups and connection tracking must see the transport
            // behind extension headers, as nftables does: otherwise a
            // hop-by-hop header hides a TCP port from a deny rule.
            let (proto, ext_len) = skip_ipv6_extensions(ip.next_header, l4)?;
            parsed.l3 = L3::Ipv6(Ipv6Info {
                src: Ipv6Addr::from(ip.src),
                dst: Ipv6Addr::from(ip.dst),
                hop_limit: ip.hop_limit,
                next_header: ip.next_header,
                proto,
                ext_len,
            });
            parsed.l4 = parse_l4(proto, l4.get(ext_len..).unwrap_or(&[]))?;
            if parsed.l4 != L4::None {
                parsed.l4_offset = l3_offset + size_of::<Ipv6Hdr>() + ext_len;
            }
        }
        _ => {}
    }
    Ok(parsed)
}

/// Extension headers walked before giving up on a packet (RFC 8200 4.1
/// recommends at most one of each, and the destination options header twice).
const MAX_IPV6_EXTENSIONS: usize = 8;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;

/// Walks IPv6 extension headers (hop-by-hop, routing, destination options,
/// and the fragment header of a first fragment) from `next` over `bytes`
/// (the IPv6 payload) to the upper-layer protocol; returns it and the
/// length of the headers skipped. A non-first fragment stops at its
/// fragment header. A chain longer than [`MAX_IPV6_EXTENSIONS`] is refused
/// rather than passed with an unknown transport.
fn skip_ipv6_extensions(mut next: u8, bytes: &[u8]) -> Result<(u8, usize), ParseError> {
    let mut off = 0usize;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let len_field = bytes
                    .get(off + 1)
                    .ok_or(ParseError::TruncatedIpv6Extension)?;
                (usize::from(*len_field) + 1) * 8
            }
            IPPROTO_FRAGMENT => {
                let offset = bytes
                    .get(off + 2..off + 4)
                    .ok_or(ParseError::TruncatedIpv6Extension)?;
                if u16::from_be_bytes([offset[0], offset[1]]) & 0xfff8 != 0 {
                    return Ok((next, off));
                }
                8
            }
            _ => return Ok((next, off)),
        };
        if bytes.len() < off + len {
            return Err(ParseError::TruncatedIpv6Extension);
        }
        next = *bytes.get(off).ok_or(ParseError::TruncatedIpv6Extension)?;
        off += len;
    }
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS => {
            Err(ParseError::TooManyIpv6Extensions)
        }
        _ => Ok((next, off)),
    }
}

fn parse_l4(proto: u8, bytes: &[u8]) -> Result<L4, ParseError> {
    Ok(match proto {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let (h, _) = IcmpHdr::ref_from_prefix(bytes).map_err(|_| ParseError::TruncatedL4)?;
            if proto == IPPROTO_ICMP {
                L4::Icmp {
                    ty: h.ty,
                    code: h.code,
                }
            } else {
                L4::Icmpv6 {
                    ty: h.ty,
                    code: h.code,
                }
            }
        }
        IPPROTO_UDP => {
            let (h, _) = UdpHdr::ref_from_prefix(bytes).map_err(|_| ParseError::TruncatedL4)?;
            L4::Udp {
                sport: h.sport.get(),
                dport: h.dport.get(),
            }
        }
        IPPROTO_TCP => {
            let (h, _) = TcpHdr::ref_from_prefix(bytes).map_err(|_| ParseError::TruncatedL4)?;
            L4::Tcp {
                sport: h.sport.get(),
                dport: h.dport.get(),
                flags: h.off_flags.get().to_be_bytes()[1],
            }
        }
        _ => L4::None,
    })
}

/// Test and benchmark frame builders (not used on the hot path).
pub mod build {
    use std::net::Ipv4Addr;

    use super::super::checksum::internet_checksum;
    use super::super::headers::{
        Mac, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_VLAN, IPPROTO_ICMP, IPPROTO_UDP,
    };

    fn eth(dst: Mac, src: Mac, vlan: Option<u16>, ethertype: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(64);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        if let Some(v) = vlan {
            f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// An IPv4 frame with a valid header checksum around `proto` + `l4`.
    #[allow(clippy::too_many_arguments)]
    pub fn ipv4(
        dst: Mac,
        src: Mac,
        vlan: Option<u16>,
        sip: Ipv4Addr,
        dip: Ipv4Addr,
        ttl: u8,
        proto: u8,
        l4: &[u8],
    ) -> Vec<u8> {
        let mut f = eth(dst, src, vlan, ETHERTYPE_IPV4);
        let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = ttl;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&sip.octets());
        ip[16..20].copy_from_slice(&dip.octets());
        let c = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    /// An ICMP echo request with `payload`.
    pub fn icmp_echo(
        dst: Mac,
        src: Mac,
        sip: Ipv4Addr,
        dip: Ipv4Addr,
        ttl: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut icmp = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(payload);
        let c = internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        ipv4(dst, src, None, sip, dip, ttl, IPPROTO_ICMP, &icmp)
    }

    /// A UDP datagram padded to a 64-byte frame (with FCS: 60 bytes here).
    pub fn udp64(dst: Mac, src: Mac, sip: Ipv4Addr, dip: Ipv4Addr) -> Vec<u8> {
        let udp = [
            0x30, 0x39, 0x00, 0x35, 0x00, 0x1a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ];
        ipv4(dst, src, None, sip, dip, 64, IPPROTO_UDP, &udp)
    }

    /// An ARP packet.
    pub fn arp(
        op: u16,
        eth_dst: Mac,
        sha: Mac,
        spa: Ipv4Addr,
        tha: Mac,
        tpa: Ipv4Addr,
        vlan: Option<u16>,
    ) -> Vec<u8> {
        let mut f = eth(eth_dst, sha, vlan, ETHERTYPE_ARP);
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sha);
        f.extend_from_slice(&spa.octets());
        f.extend_from_slice(&tha);
        f.extend_from_slice(&tpa.octets());
        f
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];
    const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn parses_icmp_echo() {
        let f = icmp_echo(B, A, IP_A, IP_B, 64, b"hello");
        let p = parse(&f).unwrap();
        assert_eq!(
            (p.src, p.dst, p.vlan, p.l3_offset, p.l4_offset),
            (A, B, None, 14, 34)
        );
        let L3::Ipv4(ip) = p.l3 else { panic!("{p:?}") };
        assert_eq!(
            (
                ip.src,
                ip.dst,
                ip.ttl,
                ip.proto,
                ip.header_len,
                ip.total_len
            ),
            (IP_A, IP_B, 64, 1, 20, 33)
        );
        assert_eq!(p.l4, L4::Icmp { ty: 8, code: 0 });
    }

    #[test]
    fn parses_tagged_arp() {
        let f = arp(1, [0xff; 6], A, IP_A, [0; 6], IP_B, Some(100));
        let p = parse(&f).unwrap();
        assert_eq!(p.vlan, Some(100));
        assert_eq!(p.l3_offset, 18);
        assert_eq!(
            p.l3,
            L3::Arp(ArpInfo {
                op: 1,
                sha: A,
                spa: IP_A,
                tpa: IP_B
            })
        );
    }

    #[test]
    fn parses_udp_and_tcp_ports() {
        let f = udp64(B, A, IP_A, IP_B);
        assert_eq!(
            parse(&f).unwrap().l4,
            L4::Udp {
                sport: 12345,
                dport: 53
            }
        );
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&80u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&4000u16.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = 0x12;
        let f = ipv4(B, A, None, IP_A, IP_B, 64, 6, &tcp);
        assert_eq!(
            parse(&f).unwrap().l4,
            L4::Tcp {
                sport: 80,
                dport: 4000,
                flags: 0x12
            }
        );
    }

    #[test]
    fn parses_ipv6_icmpv6() {
        let mut f = vec![0u8; 14 + 40 + 8];
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&8u16.to_be_bytes());
        f[20] = 58;
        f[21] = 255;
        f[54] = 135;
        let p = parse(&f).unwrap();
        assert!(matches!(
            p.l3,
            L3::Ipv6(Ipv6Info {
                hop_limit: 255,
                next_header: 58,
                proto: 58,
                ext_len: 0,
                ..
            })
        ));
        assert_eq!(p.l4, L4::Icmpv6 { ty: 135, code: 0 });
    }

    #[test]
    fn hostile_input_is_rejected_precisely() {
        let good = icmp_echo(B, A, IP_A, IP_B, 64, b"hello");
        assert_eq!(parse(&good[..13]), Err(ParseError::TruncatedEthernet));
        assert_eq!(parse(&good[..30]), Err(ParseError::TruncatedIpv4));
        // Total length claims more than the frame holds.
        assert_eq!(parse(&good[..40]), Err(ParseError::BadIpv4Length));
        let mut f = good.clone();
        f[14] = 0x44; // IHL 4 words < 20 bytes
        assert_eq!(parse(&f), Err(ParseError::BadIpv4Header));
        let mut f = good.clone();
        f[14] = 0x65; // version 6 in an IPv4 ethertype
        assert_eq!(parse(&f), Err(ParseError::BadIpv4Header));
        let mut f = good.clone();
        f[14] = 0x4f; // IHL 60 bytes > total length 33
        assert_eq!(parse(&f), Err(ParseError::BadIpv4Length));
        let mut f = good.clone();
        f[16..18].copy_from_slice(&22u16.to_be_bytes()); // room for only 2 ICMP bytes
        assert_eq!(parse(&f), Err(ParseError::TruncatedL4));
        let tagged = arp(1, [0xff; 6], A, IP_A, [0; 6], IP_B, Some(5));
        assert_eq!(parse(&tagged[..16]), Err(ParseError::TruncatedVlan));
        assert_eq!(parse(&tagged[..30]), Err(ParseError::TruncatedArp));
        let mut qinq = tagged.clone();
        qinq[16..18].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(parse(&qinq), Err(ParseError::StackedVlan));
        let mut bad_arp = arp(1, [0xff; 6], A, IP_A, [0; 6], IP_B, None);
        bad_arp[18] = 8; // hlen 8
        assert_eq!(parse(&bad_arp), Err(ParseError::UnsupportedArp));
    }

    #[test]
    fn later_fragments_have_no_transport_header() {
        let mut f = icmp_echo(B, A, IP_A, IP_B, 64, b"hello");
        f[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
        let p = parse(&f).unwrap();
        assert_eq!(p.l4, L4::None);
        let L3::Ipv4(ip) = p.l3 else { panic!() };
        assert!(ip.later_fragment);
    }

    /// An IPv6 frame whose payload is `ext` (extension headers, each given
    /// as (next header, bytes)) then a TCP SYN to port 22.
    fn ipv6_tcp_behind(first: u8, ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (next, body) in ext {
            let mut h = body.clone();
            h[0] = *next;
            payload.extend_from_slice(&h);
        }
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&22u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02;
        payload.extend_from_slice(&tcp);
        let mut f = vec![0u8; 14 + 40];
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        f[20] = first;
        f[21] = 64;
        f.extend_from_slice(&payload);
        f
    }

    /// Found by dataplane/tests/nft_compare.rs: a hop-by-hop or destination
    /// options header hid the TCP port from security groups (a deny rule on
    /// TCP 22 did not match, an allow-any rule let the SYN in), while
    /// nftables matched the port behind it.
    #[test]
    fn ipv6_transport_is_found_behind_extension_headers() {
        let opts = |len_units: u8| {
            let mut h = vec![0u8; (usize::from(len_units) + 1) * 8];
            h[1] = len_units;
            h
        };
        let frag = |offset: u16| {
            let mut h = vec![0u8; 8];
            h[2..4].copy_from_slice(&(offset << 3).to_be_bytes());
            h
        };
        let tcp = L4::Tcp {
            sport: 40000,
            dport: 22,
            flags: 0x02,
        };
        // Hop-by-hop (8 bytes), routing (16), destination options (8), first fragment (8).
        let f = ipv6_tcp_behind(
            0,
            &[(43, opts(0)), (60, opts(1)), (44, opts(0)), (6, frag(0))],
        );
        let p = parse(&f).unwrap();
        assert_eq!(p.l4, tcp);
        assert_eq!(p.l4_offset, 14 + 40 + 40);
        let L3::Ipv6(ip) = p.l3 else { panic!() };
        assert_eq!((ip.next_header, ip.proto, ip.ext_len), (0, 6, 40));
        let x = crate::conntrack::key::extract(&p, &f).unwrap();
        assert_eq!((x.key.proto, x.key.sport, x.key.dport), (6, 40000, 22));
        assert!(
            x.tcp.is_some(),
            "the SYN is seen, so it may start a connection"
        );

        // A later fragment carries no transport header: the walk stops at it.
        let f = ipv6_tcp_behind(60, &[(44, opts(0)), (6, frag(185))]);
        let p = parse(&f).unwrap();
        assert_eq!(p.l4, L4::None);
        let L3::Ipv6(ip) = p.l3 else { panic!() };
        assert_eq!((ip.proto, ip.ext_len), (44, 8));

        // Hostile chains: truncated, and longer than the walk allows.
        let f = ipv6_tcp_behind(0, &[(6, opts(4))]);
        assert_eq!(
            parse(&f[..14 + 40 + 16]).unwrap_err(),
            ParseError::BadIpv6Length
        );
        let mut cut = f.clone();
        cut[18..20].copy_from_slice(&16u16.to_be_bytes());
        assert_eq!(
            parse(&cut[..14 + 40 + 16]),
            Err(ParseError::TruncatedIpv6Extension)
        );
        let chain: Vec<(u8, Vec<u8>)> = (0..MAX_IPV6_EXTENSIONS + 1)
            .map(|i| (if i == MAX_IPV6_EXTENSIONS { 6 } else { 60 }, opts(0)))
            .collect();
        assert_eq!(
            parse(&ipv6_tcp_behind(60, &chain)),
            Err(ParseError::TooManyIpv6Extensions)
        );
        let chain = &chain[1..];
        assert_eq!(parse(&ipv6_tcp_behind(60, chain)).unwrap().l4, tcp);
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut f = icmp_echo(B, A, IP_A, IP_B, 64, b"");
        f.resize(60, 0);
        let L3::Ipv4(ip) = parse(&f).unwrap().l3 else {
            panic!()
        };
        assert_eq!(ip.total_len, 28);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            pos in 0usize..80, val in any::<u8>(), cut in 0usize..80,
        ) {
            for base in [icmp_echo(B, A, IP_A, IP_B, 64, b"0123456789abcdef"), arp(1, [0xff; 6], A, IP_A, [0; 6], IP_B, Some(7))] {
                let mut f = base.clone();
                if pos < f.len() { f[pos] = val; }
                f.truncate(cut.min(f.len()));
                if let Ok(p) = parse(&f) {
                    prop_assert!(p.l3_offset <= f.len());
                    prop_assert!(p.l4_offset <= f.len());
                }
            }
        }
    }
}
