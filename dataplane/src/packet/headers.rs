//! Wire header layouts as `zerocopy` types (network byte order, unaligned).

use zerocopy::network_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A MAC address.
pub type Mac = [u8; 6];

/// The Ethernet broadcast address.
pub const BROADCAST: Mac = [0xff; 6];

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// Ethernet II header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EthHdr {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: U16,
}

/// 802.1Q tag following the source MAC (TPID is the outer ethertype).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VlanTag {
    pub tci: U16,
    pub ethertype: U16,
}

/// ARP for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ArpHdr {
    pub htype: U16,
    pub ptype: U16,
    pub hlen: u8,
    pub plen: u8,
    pub op: U16,
    pub sha: Mac,
    pub spa: [u8; 4],
    pub tha: Mac,
    pub tpa: [u8; 4],
}

/// IPv4 header without options.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: U16,
    pub id: U16,
    pub frag: U16,
    pub ttl: u8,
    pub proto: u8,
    pub checksum: U16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// IPv6 fixed header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: U32,
    pub payload_len: U16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// ICMP and ICMPv6 common header (type, code, checksum, 4 bytes rest).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub checksum: U16,
    pub rest: U32,
}

/// UDP header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct UdpHdr {
    pub sport: U16,
    pub dport: U16,
    pub len: U16,
    pub checksum: U16,
}

/// TCP header without options.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TcpHdr {
    pub sport: U16,
    pub dport: U16,
    pub seq: U32,
    pub ack: U32,
    pub off_flags: U16,
    pub window: U16,
    pub checksum: U16,
    pub urgent: U16,
}

/// Whether a MAC is a group (broadcast or multicast) address.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff` (for traces and errors, not the hot path).
pub fn mac_to_string(mac: &Mac) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes_match_the_wire() {
        assert_eq!(size_of::<EthHdr>(), 14);
        assert_eq!(size_of::<VlanTag>(), 4);
        assert_eq!(size_of::<ArpHdr>(), 28);
        assert_eq!(size_of::<Ipv4Hdr>(), 20);
        assert_eq!(size_of::<Ipv6Hdr>(), 40);
        assert_eq!(size_of::<IcmpHdr>(), 8);
        assert_eq!(size_of::<UdpHdr>(), 8);
        assert_eq!(size_of::<TcpHdr>(), 20);
    }

    #[test]
    fn mac_text_round_trips_and_rejects_junk() {
        let mac = parse_mac("02:00:0a:ff:00:01").unwrap();
        assert_eq!(mac_to_string(&mac), "02:00:0a:ff:00:01");
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "zz:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert!(is_group(&BROADCAST));
        assert!(!is_group(&mac));
    }
}
