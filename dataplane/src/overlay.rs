//! Overlay between hosts: logical switches stretched over an IPv4 underlay
//! with Geneve (RFC 8926, UDP 6081) or VXLAN (RFC 7348, UDP 4789).
//!
//! Each overlay switch has a VNI; ports on other hosts are *remote ports*
//! (name, switch, MAC/IP bindings and the tunnel endpoint holding them), so
//! the ARP/ND responders, port security and routing know them like local
//! ones. A frame whose destination resolves to a remote port leaves as
//! [`crate::pipeline::Verdict::Tunnel`]: the engine writes the outer
//! Ethernet/IPv4/UDP/Geneve header ([`OverlayTables::header`], a 50-byte
//! stack array) in front of the frame while copying it into the transmit
//! buffer, as it does for ERSPAN mirror copies: no allocation, no extra copy.
//! Floods on an overlay switch are replicated head-end to every endpoint
//! holding a port of it. Frames arriving on the underlay interface for the
//! local endpoint address and UDP port are validated ([`parse_tunnel`]),
//! stripped and run through the pipeline as ingress from the VNI's switch;
//! they are only delivered to local ports (never back into the tunnel).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::fastmap::{self, FastMap};
use crate::packet::checksum::internet_checksum;
use crate::packet::headers::Mac;
use crate::tables::SwitchId;

/// Geneve's IANA UDP port.
pub const GENEVE_PORT: u16 = 6081;
/// VXLAN's IANA UDP port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer Ethernet (14) + IPv4 (20) + UDP (8) + Geneve or VXLAN (8) bytes.
pub const HEADER_LEN: usize = 50;
/// What encapsulation adds to an inner IP packet: its Ethernet header
/// travels too, so the inner MTU is the underlay MTU minus
/// `HEADER_LEN` (the outer Ethernet header is outside the underlay MTU,
/// the inner one inside).
pub const OVERHEAD: usize = HEADER_LEN;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Geneve's protocol type for an Ethernet payload (Transparent Ethernet Bridging).
const ETH_BRIDGING: u16 = 0x6558;

/// Which encapsulation the tunnels use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encapsulation {
    #[default]
    Geneve,
    Vxlan,
}

impl Encapsulation {
    /// The destination UDP port.
    pub fn udp_port(self) -> u16 {
        match self {
            Encapsulation::Geneve => GENEVE_PORT,
            Encapsulation::Vxlan => VXLAN_PORT,
        }
    }
}

/// The overlay section of the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    /// The underlay data-plane interface (no logical port may use it).
    pub interface: String,
    /// This host's tunnel endpoint address on the underlay.
    pub local_ip: String,
    /// The source MAC of encapsulated frames (the underlay interface's).
    pub local_mac: String,
    #[serde(default)]
    pub encapsulation: Encapsulation,
    /// Underlay IP MTU; inner packets above `mtu - 50` are answered with
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big".
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// The overlay switches and their VNIs.
    #[serde(default)]
    pub switches: Vec<OverlaySwitchSpec>,
    /// Remote tunnel endpoints and the underlay MAC to reach each (static
    /// next hop: the peer's, or the underlay router's).
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// Ports held by other hosts: the remote port location table.
    #[serde(default)]
    pub remote_ports: Vec<RemotePortSpec>,
}

fn default_mtu() -> u16 {
    1500
}

/// An overlay switch's VNI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySwitchSpec {
    pub switch: String,
    /// 0..=16777215, unique.
    pub vni: u32,
}

/// A remote tunnel endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub ip: String,
    /// Underlay next-hop MAC towards `ip`.
    pub mac: String,
}

/// A port on another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemotePortSpec {
    pub name: String,
    pub switch: String,
    /// The tunnel endpoint (an `endpoints` address) holding the port.
    pub endpoint: String,
    pub mac: String,
    /// Bound IPv4 and IPv6 addresses.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// Why an overlay section was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    #[error("Overlay: unknown underlay interface {0:?}")]
    UnknownInterface(String),
    #[error("Overlay: underlay interface {interface:?} also carries logical port {port:?}")]
    InterfaceInUse { interface: String, port: String },
    #[error("Overlay: {owner}: bad address {value:?}")]
    BadAddress { owner: String, value: String },
    #[error("Overlay: MTU {0} outside 576..=9000")]
    BadMtu(u16),
    #[error("Overlay: switch {switch:?}: VNI {vni} above 16777215 (24 bits)")]
    BadVni { switch: String, vni: u32 },
    #[error("Overlay: VNI {vni} is used by switches {first:?} and {second:?}")]
    DuplicateVni {
        vni: u32,
        first: String,
        second: String,
    },
    #[error("Overlay: switch {0:?} is listed twice")]
    DuplicateSwitch(String),
    #[error("Overlay: {owner}: unknown switch {switch:?}")]
    UnknownSwitch { owner: String, switch: String },
    #[error("Overlay: remote port {port:?}: switch {switch:?} has no VNI")]
    SwitchWithoutVni { port: String, switch: String },
    #[error("Overlay: remote port {port:?}: unknown endpoint {endpoint:?}")]
    UnknownEndpoint { port: String, endpoint: String },
    #[error("Overlay: endpoint {0} is listed twice (or is the local address)")]
    DuplicateEndpoint(Ipv4Addr),
    #[error("Overlay: {count} endpoints (limit 65535)")]
    TooManyEndpoints { count: usize },
}

/// A compiled remote endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// The compiled overlay.
#[derive(Debug, Clone)]
pub struct OverlayTables {
    /// Underlay interface index.
    pub port: u16,
    pub local_ip: Ipv4Addr,
    pub local_mac: Mac,
    pub encap: Encapsulation,
    pub udp_port: u16,
    /// Underlay IP MTU.
    pub mtu: usize,
    pub endpoints: Vec<Endpoint>,
    pub vni_switch: FastMap<u32, SwitchId>,
}

impl OverlayTables {
    /// Whether a `frame_len`-byte inner frame fits the underlay once encapsulated.
    // hot path: one compare.
    #[inline]
    pub fn fits(&self, frame_len: usize) -> bool {
        frame_len + HEADER_LEN - 14 <= self.mtu
    }

    /// The largest inner IP packet (untagged): what ICMP errors announce.
    pub fn inner_mtu(&self) -> usize {
        self.mtu.saturating_sub(OVERHEAD)
    }

    /// The outer headers for a `frame_len`-byte inner frame to `endpoint`;
    /// `entropy` picks the UDP source port (the flow's hash, so the
    /// underlay's ECMP and RSS spread flows, RFC 8926 3.3).
    // hot path: a 50-byte stack array, one 20-byte checksum.
    pub fn header(
        &self,
        endpoint: u16,
        vni: u32,
        entropy: u16,
        frame_len: usize,
    ) -> Option<[u8; HEADER_LEN]> {
        let ep = self.endpoints.get(usize::from(endpoint))?;
        let ip_len = u16::try_from(frame_len + HEADER_LEN - 14).ok()?;
        let mut h = [0u8; HEADER_LEN];
        h[0..6].copy_from_slice(&ep.mac);
        h[6..12].copy_from_slice(&self.local_mac);
        h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        h[14] = 0x45;
        h[16..18].copy_from_slice(&ip_len.to_be_bytes());
        // DF: the underlay must not fragment; oversize is answered at ingress.
        h[20] = 0x40;
        h[22] = 64;
        h[23] = crate::packet::headers::IPPROTO_UDP;
        h[26..30].copy_from_slice(&self.local_ip.octets());
        h[30..34].copy_from_slice(&ep.ip.octets());
        let c = internet_checksum(h.get(14..34)?);
        h[24..26].copy_from_slice(&c.to_be_bytes());
        // Source port in the dynamic range 49152..=65535.
        let sport = 0xc000 | (entropy & 0x3fff);
        h[34..36].copy_from_slice(&sport.to_be_bytes());
        h[36..38].copy_from_slice(&self.udp_port.to_be_bytes());
        h[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
        // UDP checksum 0: allowed over IPv4, and what Linux sends by default.
        let tunnel: &mut [u8; 8] = h.get_mut(42..50)?.try_into().ok()?;
        build_tunnel_header(self.encap, vni, tunnel);
        Some(h)
    }
}

/// Writes the 8-byte Geneve (no options) or VXLAN header for `vni`.
pub fn build_tunnel_header(encap: Encapsulation, vni: u32, out: &mut [u8; 8]) {
    *out = [0; 8];
    match encap {
        Encapsulation::Geneve => {
            out[2..4].copy_from_slice(&ETH_BRIDGING.to_be_bytes());
        }
        Encapsulation::Vxlan => out[0] = 0x08,
    }
    out[4..8].copy_from_slice(&(vni << 8).to_be_bytes());
}

/// Why a tunnel header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("truncated tunnel header")]
    Truncated,
    #[error("Geneve version {0} (only 0 is known)")]
    Version(u8),
    #[error("Geneve options run past the packet")]
    OptionsTooLong,
    #[error("Geneve critical option present (none is understood)")]
    CriticalOption,
    #[error("Geneve OAM (control) packet")]
    Oam,
    #[error("payload protocol {0:#06x} is not Ethernet")]
    NotEthernet(u16),
    #[error("VXLAN flags {0:#04x} without the VNI flag")]
    VxlanFlags(u8),
    #[error("inner frame shorter than an Ethernet header")]
    ShortInner,
}

/// Parses the tunnel header at the start of a UDP payload: `(vni, header
/// length)`; the inner Ethernet frame follows. Never panics.
// hot path: a few byte compares.
pub fn parse_tunnel(encap: Encapsulation, payload: &[u8]) -> Result<(u32, usize), TunnelError> {
    let h: &[u8; 8] = payload
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or(TunnelError::Truncated)?;
    let vni = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) >> 8;
    let hlen = match encap {
        Encapsulation::Geneve => {
            let version = h[0] >> 6;
            if version != 0 {
                return Err(TunnelError::Version(version));
            }
            let hlen = 8 + usize::from(h[0] & 0x3f) * 4;
            if payload.len() < hlen {
                return Err(TunnelError::OptionsTooLong);
            }
            if h[1] & 0x80 != 0 {
                return Err(TunnelError::Oam);
            }
            if h[1] & 0x40 != 0 {
                return Err(TunnelError::CriticalOption);
            }
            let proto = u16::from_be_bytes([h[2], h[3]]);
            if proto != ETH_BRIDGING {
                return Err(TunnelError::NotEthernet(proto));
            }
            hlen
        }
        Encapsulation::Vxlan => {
            if h[0] & 0x08 == 0 {
                return Err(TunnelError::VxlanFlags(h[0]));
            }
            8
        }
    };
    if payload.len() < hlen + 14 {
        return Err(TunnelError::ShortInner);
    }
    Ok((vni, hlen))
}

/// What [`compile`] adds to the other tables.
pub struct Compiled {
    pub tables: OverlayTables,
    /// VNI per switch (indexed like the switches).
    pub vnis: Vec<Option<u32>>,
    /// The remote ports, validated.
    pub remote_ports: Vec<RemotePort>,
}

/// A validated remote port.
pub struct RemotePort {
    pub name: String,
    pub switch: SwitchId,
    pub endpoint: u16,
    pub mac: Mac,
    pub ips: Vec<Ipv4Addr>,
    pub ips6: Vec<std::net::Ipv6Addr>,
}

/// Validates the overlay section against the switches, interfaces and the
/// local ports' interfaces (`(port name, interface)`).
pub fn compile(
    spec: &OverlaySpec,
    switch_names: &[&str],
    interfaces: &[String],
    local_ports: &[(&str, &str)],
) -> Result<Compiled, OverlayError> {
    let port = interfaces
        .iter()
        .position(|i| *i == spec.interface)
        .and_then(|i| u16::try_from(i).ok())
        .ok_or_else(|| OverlayError::UnknownInterface(spec.interface.clone()))?;
    if let Some((name, _)) = local_ports.iter().find(|(_, i)| *i == spec.interface) {
        return Err(OverlayError::InterfaceInUse {
            interface: spec.interface.clone(),
            port: (*name).to_string(),
        });
    }
    let bad = |owner: &str, value: &str| OverlayError::BadAddress {
        owner: owner.to_string(),
        value: value.to_string(),
    };
    let local_ip: Ipv4Addr = spec
        .local_ip
        .parse()
        .map_err(|_| bad("local_ip", &spec.local_ip))?;
    let mac_of = |owner: &str, v: &str| {
        crate::packet::headers::parse_mac(v)
            .filter(|m| !crate::packet::headers::is_group(m) && *m != [0; 6])
            .ok_or_else(|| bad(owner, v))
    };
    let local_mac = mac_of("local_mac", &spec.local_mac)?;
    if !(576..=9000).contains(&spec.mtu) {
        return Err(OverlayError::BadMtu(spec.mtu));
    }
    let switch_id = |owner: &str, name: &str| {
        switch_names
            .iter()
            .position(|s| *s == name)
            .and_then(|i| SwitchId::try_from(i).ok())
            .ok_or_else(|| OverlayError::UnknownSwitch {
                owner: owner.to_string(),
                switch: name.to_string(),
            })
    };
    let mut vnis = vec![None; switch_names.len()];
    let mut vni_switch = fastmap::with_capacity(spec.switches.len());
    let mut vni_owner: HashMap<u32, &str> = HashMap::new();
    for s in &spec.switches {
        let id = switch_id("VNI list", &s.switch)?;
        if s.vni > MAX_VNI {
            return Err(OverlayError::BadVni {
                switch: s.switch.clone(),
                vni: s.vni,
            });
        }
        if let Some(first) = vni_owner.insert(s.vni, &s.switch) {
            return Err(OverlayError::DuplicateVni {
                vni: s.vni,
                first: first.to_string(),
                second: s.switch.clone(),
            });
        }
        let slot = vnis.get_mut(id as usize);
        match slot {
            Some(Some(_)) => return Err(OverlayError::DuplicateSwitch(s.switch.clone())),
            Some(v) => *v = Some(s.vni),
            None => {}
        }
        vni_switch.insert(s.vni, id);
    }
    if spec.endpoints.len() > usize::from(u16::MAX) {
        return Err(OverlayError::TooManyEndpoints {
            count: spec.endpoints.len(),
        });
    }
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(spec.endpoints.len());
    for e in &spec.endpoints {
        let ip: Ipv4Addr = e.ip.parse().map_err(|_| bad("endpoint", &e.ip))?;
        if ip == local_ip || endpoints.iter().any(|x| x.ip == ip) {
            return Err(OverlayError::DuplicateEndpoint(ip));
        }
        let mac = mac_of(&format!("endpoint {ip}"), &e.mac)?;
        endpoints.push(Endpoint { ip, mac });
    }
    let mut remote_ports = Vec::with_capacity(spec.remote_ports.len());
    for r in &spec.remote_ports {
        let owner = format!("remote port {:?}", r.name);
        let switch = switch_id(&owner, &r.switch)?;
        if vnis.get(switch as usize).copied().flatten().is_none() {
            return Err(OverlayError::SwitchWithoutVni {
                port: r.name.clone(),
                switch: r.switch.clone(),
            });
        }
        let endpoint = r
            .endpoint
            .parse::<Ipv4Addr>()
            .ok()
            .and_then(|ip| endpoints.iter().position(|e| e.ip == ip))
            .and_then(|i| u16::try_from(i).ok())
            .ok_or_else(|| OverlayError::UnknownEndpoint {
                port: r.name.clone(),
                endpoint: r.endpoint.clone(),
            })?;
        let mac = mac_of(&owner, &r.mac)?;
        let mut ips = Vec::new();
        let mut ips6 = Vec::new();
        for ip in &r.ips {
            if let Ok(v6) = ip.parse::<std::net::Ipv6Addr>() {
                ips6.push(v6);
            } else {
                ips.push(ip.parse::<Ipv4Addr>().map_err(|_| bad(&owner, ip))?);
            }
        }
        remote_ports.push(RemotePort {
            name: r.name.clone(),
            switch,
            endpoint,
            mac,
            ips,
            ips6,
        });
    }
    Ok(Compiled {
        tables: OverlayTables {
            port,
            local_ip,
            local_mac,
            encap: spec.encapsulation,
            udp_port: spec.encapsulation.udp_port(),
            mtu: usize::from(spec.mtu),
            endpoints,
            vni_switch,
        },
        vnis,
        remote_ports,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn tables(encap: Encapsulation) -> OverlayTables {
        OverlayTables {
            port: 0,
            local_ip: "198.18.0.1".parse().unwrap(),
            local_mac: [2, 0, 0, 0, 0, 1],
            encap,
            udp_port: encap.udp_port(),
            mtu: 1500,
            endpoints: vec![Endpoint {
                ip: "198.18.0.2".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 2],
            }],
            vni_switch: fastmap::with_capacity(0),
        }
    }

    #[test]
    fn geneve_header_round_trips() {
        let t = tables(Encapsulation::Geneve);
        let h = t.header(0, 0xabcdef, 0x1234, 100).unwrap();
        // Outer IPv4: total length, DF, TTL, UDP, a valid checksum.
        assert_eq!(&h[0..6], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([h[16], h[17]]), 136);
        assert_eq!(h[20], 0x40);
        assert_eq!(internet_checksum(&h[14..34]), 0);
        assert_eq!(u16::from_be_bytes([h[36], h[37]]), GENEVE_PORT);
        assert_eq!(u16::from_be_bytes([h[38], h[39]]), 116);
        assert!(u16::from_be_bytes([h[34], h[35]]) >= 0xc000);
        let mut payload = h[42..].to_vec();
        payload.extend_from_slice(&[0u8; 100]);
        assert_eq!(
            parse_tunnel(Encapsulation::Geneve, &payload),
            Ok((0xabcdef, 8))
        );
        assert!(t.header(1, 1, 0, 100).is_none(), "unknown endpoint");
    }

    #[test]
    fn vxlan_header_round_trips() {
        let t = tables(Encapsulation::Vxlan);
        let h = t.header(0, 42, 0, 64).unwrap();
        assert_eq!(u16::from_be_bytes([h[36], h[37]]), VXLAN_PORT);
        assert_eq!(h[42], 0x08);
        let mut payload = h[42..].to_vec();
        payload.extend_from_slice(&[0u8; 64]);
        assert_eq!(parse_tunnel(Encapsulation::Vxlan, &payload), Ok((42, 8)));
        payload[0] = 0;
        assert_eq!(
            parse_tunnel(Encapsulation::Vxlan, &payload),
            Err(TunnelError::VxlanFlags(0))
        );
    }

    #[test]
    fn malformed_geneve_is_refused() {
        let mut ok = [0u8; 8 + 14];
        build_tunnel_header(Encapsulation::Geneve, 7, (&mut ok[..8]).try_into().unwrap());
        let g = |b: &[u8]| parse_tunnel(Encapsulation::Geneve, b);
        assert_eq!(g(&ok), Ok((7, 8)));
        assert_eq!(g(&ok[..7]), Err(TunnelError::Truncated));
        assert_eq!(g(&ok[..20]), Err(TunnelError::ShortInner));
        let mut v = ok;
        v[0] = 0x40;
        assert_eq!(g(&v), Err(TunnelError::Version(1)));
        let mut o = ok;
        o[0] = 0x3f; // 252 bytes of options, not there
        assert_eq!(g(&o), Err(TunnelError::OptionsTooLong));
        let mut c = ok;
        c[1] = 0x40;
        assert_eq!(g(&c), Err(TunnelError::CriticalOption));
        let mut oam = ok;
        oam[1] = 0x80;
        assert_eq!(g(&oam), Err(TunnelError::Oam));
        let mut p = ok;
        p[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(g(&p), Err(TunnelError::NotEthernet(0x0800)));
        // Non-critical options are skipped.
        let mut with_opt = vec![1u8, 0, 0x65, 0x58, 0, 0, 7, 0, 1, 2, 3, 4];
        with_opt.extend_from_slice(&[0; 14]);
        assert_eq!(g(&with_opt), Ok((7, 12)));
    }

    #[test]
    fn fits_and_inner_mtu() {
        let t = tables(Encapsulation::Geneve);
        assert_eq!(t.inner_mtu(), 1450);
        assert!(t.fits(1450 + 14));
        assert!(!t.fits(1451 + 14));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            for e in [Encapsulation::Geneve, Encapsulation::Vxlan] {
                if let Ok((_, hlen)) = parse_tunnel(e, &bytes) {
                    prop_assert!(hlen + 14 <= bytes.len());
                }
            }
        }
    }
}
