//! Which worker processes a frame: software flow steering for several
//! workers, so that each worker's connection table sees whole connections.
//!
//! # Design
//!
//! Every frame is owned by exactly one worker, [`frame_worker`], a hash that
//! is *symmetric* in the endpoints ([`crate::conntrack::steer`]), taken over
//! the flow's *inside view*:
//!
//! - IP: the 5-tuple (ICMP echo: the identifier as both ports; an ICMP error:
//!   the tuple of the packet it quotes, so it meets that packet's
//!   connection). Both directions of an un-NATed connection meet.
//! - DNAT and floating IPs are static, so an address (and port) that is a
//!   router's DNAT external side is replaced by its internal side before
//!   hashing ([`steering_key`]): the outside's packets to `E:e` steer like
//!   the inside's replies from `I:i`.
//! - L4 load balancers ([`crate::lb4`]): a VIP or member endpoint (address,
//!   port, protocol) is replaced by zero, so client → VIP and member →
//!   client hash by the client's side alone and meet, whichever member the
//!   Maglev table picked.
//! - SNAT (and NAT64) replies come back to an address and port the worker
//!   chose; the worker only chooses ports whose reply tuple steers to itself
//!   ([`Shard::owns`], VPP NAT44-ED's trick), so the reply meets its session
//!   with no shared state and two workers can never pick the same reply
//!   tuple.
//! - ARP: the sorted (sender, target) protocol addresses, so a request and
//!   its reply meet (the worker that learned the asker's MAC answers back).
//!   Other non-IP frames: the sorted MAC pair.
//! - IPv4 non-first fragments carry no ports: they steer by addresses only
//!   (they are not tracked; see [`crate::stateful`]).
//!
//! The hash has a fixed seed: every worker must agree. It cannot be the
//! kernel's (AF_PACKET fanout hashes with a per-boot random seed), so the
//! engine hands frames that arrived on the wrong worker over through a ring
//! ([`crate::handoff`]).
//!
//! # Assumptions
//!
//! - The DNAT lookup scans the routers' DNAT lists (a handful per router);
//!   a hash table compiled at apply time would be the step for thousands.
//! - A NAT64 pool address is not also a DNAT external address.

use crate::conntrack::key::{extract, from_v4, Key};
use crate::conntrack::steer;
use crate::packet::parse::{parse, L3};
use crate::tables::Tables;

/// A worker's place among the data plane's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard::SOLE
    }
}

impl Shard {
    /// The only worker.
    pub const SOLE: Shard = Shard { index: 0, count: 1 };

    /// Whether a frame with this tuple on the wire steers to this worker
    /// (always, for a sole worker).
    pub fn owns(&self, t: &Tables, k: &Key) -> bool {
        self.count <= 1 || key_worker(t, k, self.count) == self.index
    }

    /// [`Shard::owns`] without the DNAT mapping (NAT64 pool tuples).
    pub fn owns_raw(&self, k: &Key) -> bool {
        self.count <= 1 || steer(k.src, k.sport, k.dst, k.dport, k.proto, self.count) == self.index
    }
}

/// `(addr, port)` seen from inside when it is a DNAT external side; a
/// load-balancer VIP or member endpoint is left out (zero), so a client's
/// packets to a VIP and the member's replies hash alike.
fn inside(t: &Tables, proto: u8, addr: u128, port: u16) -> (u128, u16) {
    if t.stateful.lb.is_endpoint(proto, addr, port) {
        return (0, 0);
    }
    for rs in t.stateful.routers.iter().flatten() {
        for d in &rs.dnat {
            if d.external != addr {
                continue;
            }
            match d.forward {
                None => return (d.internal, port),
                Some((p, ext, int)) if p == proto && ext == port => return (d.internal, int),
                Some(_) => {}
            }
        }
    }
    (addr, port)
}

/// The tuple a flow is steered by: `k` with DNAT external sides replaced by
/// their internal ones.
pub fn steering_key(t: &Tables, k: &Key) -> Key {
    let (src, sport) = inside(t, k.proto, k.src, k.sport);
    let (dst, dport) = inside(t, k.proto, k.dst, k.dport);
    Key {
        src,
        sport,
        dst,
        dport,
        ..*k
    }
}

/// The worker owning a tuple, out of `workers`.
pub fn key_worker(t: &Tables, k: &Key, workers: usize) -> usize {
    let k = steering_key(t, k);
    steer(k.src, k.sport, k.dst, k.dport, k.proto, workers)
}

/// The tuple of the common case read straight from the frame: untagged
/// IPv4 without options or fragmentation carrying TCP or UDP. Anything else
/// (or a frame too short for it) takes the full parse. The same tuple
/// [`extract`] gives, without its validation: a malformed frame may steer
/// anywhere, and is then dropped by its worker's pipeline.
// hot path: a few fixed-offset reads.
fn plain_ipv4_l4(f: &[u8]) -> Option<Key> {
    let h: &[u8; 38] = f.get(..38)?.try_into().ok()?;
    let plain = h[12] == 0x08 && h[13] == 0x00 && h[14] == 0x45;
    let unfragmented = h[20] & 0x3f == 0 && h[21] == 0;
    let proto = h[23];
    if !plain
        || !unfragmented
        || !(proto == crate::packet::headers::IPPROTO_TCP
            || proto == crate::packet::headers::IPPROTO_UDP)
    {
        return None;
    }
    let ip = |o: usize| crate::conntrack::key::v4([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    Some(Key {
        src: ip(26),
        dst: ip(30),
        zone: 0,
        sport: u16::from_be_bytes([h[34], h[35]]),
        dport: u16::from_be_bytes([h[36], h[37]]),
        proto,
    })
}

/// The inner frame of a Geneve/VXLAN frame to the local tunnel endpoint
/// (untagged outer IPv4 without options, as [`crate::overlay`] sends).
fn tunnel_inner<'f>(o: &crate::overlay::OverlayTables, frame: &'f [u8]) -> Option<&'f [u8]> {
    let k = plain_ipv4_l4(frame)?;
    let ours = k.proto == crate::packet::headers::IPPROTO_UDP
        && k.dport == o.udp_port
        && k.dst == from_v4(o.local_ip);
    if !ours {
        return None;
    }
    let payload = frame.get(42..)?;
    let (_, hlen) = crate::overlay::parse_tunnel(o.encap, payload).ok()?;
    payload.get(hlen..)
}

fn mac_u128(m: &[u8; 6]) -> u128 {
    let mut b = [0u8; 16];
    b[10..].copy_from_slice(m);
    u128::from_be_bytes(b)
}

/// The worker that processes `frame`, out of `workers`. Malformed frames go
/// to worker 0 (which counts their drop).
// hot path (several workers only): one header parse and one hash.
pub fn frame_worker(t: &Tables, frame: &[u8], workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    // Tunnel frames steer by the frame inside, so they meet the local
    // side's replies (stateful services see whole connections).
    let frame = t
        .overlay
        .as_ref()
        .and_then(|o| tunnel_inner(o, frame))
        .unwrap_or(frame);
    if let Some(k) = plain_ipv4_l4(frame) {
        return key_worker(t, &k, workers);
    }
    let Ok(p) = parse(frame) else {
        return 0;
    };
    match p.l3 {
        L3::Arp(a) => steer(from_v4(a.spa), 0, from_v4(a.tpa), 0, 0, workers),
        L3::Other(_) => steer(mac_u128(&p.src), 0, mac_u128(&p.dst), 0, 0, workers),
        L3::Ipv4(ip) if ip.later_fragment => {
            steer(from_v4(ip.src), 0, from_v4(ip.dst), 0, ip.proto, workers)
        }
        L3::Ipv4(_) | L3::Ipv6(_) => match extract(&p, frame) {
            Some(x) => key_worker(t, &x.related.unwrap_or(x.key), workers),
            None => 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::ipv4;

    /// A tunnel frame steers like the frame inside it, so a remote VM's
    /// packets meet the local VM's replies.
    #[test]
    fn tunnel_frames_steer_by_the_inner_flow() {
        use crate::overlay::Encapsulation;
        use crate::testutil::{overlay_interfaces, overlay_topology};
        for encap in [Encapsulation::Geneve, Encapsulation::Vxlan] {
            let t =
                crate::config::compile(&overlay_topology(encap), &overlay_interfaces(), 1).unwrap();
            let mut o = t.overlay.clone().unwrap();
            o.local_ip = "198.18.0.2".parse().unwrap();
            o.endpoints[0].ip = "198.18.0.1".parse().unwrap();
            for sport in 1000..1064u16 {
                let mut l4 = [0u8; 8];
                l4[0..2].copy_from_slice(&sport.to_be_bytes());
                l4[2..4].copy_from_slice(&53u16.to_be_bytes());
                l4[4..6].copy_from_slice(&8u16.to_be_bytes());
                let src = "10.0.1.50".parse().unwrap();
                let dst = "10.0.1.10".parse().unwrap();
                let inner = ipv4([2; 6], [4; 6], None, src, dst, 64, 17, &l4);
                let mut outer = o.header(0, 100, sport, inner.len()).unwrap().to_vec();
                outer.extend_from_slice(&inner);
                for workers in [2, 3] {
                    assert_eq!(
                        frame_worker(&t, &outer, workers),
                        frame_worker(&t, &inner, workers)
                    );
                }
            }
        }
    }

    /// The fixed-offset fast path reads the same tuple as the full parse.
    #[test]
    fn fast_path_tuple_matches_the_full_parse() {
        for (proto, sport, dport) in [(6u8, 40000u16, 443u16), (17, 5353, 53), (17, 1, 65535)] {
            let mut l4 = [0u8; 20];
            l4[0..2].copy_from_slice(&sport.to_be_bytes());
            l4[2..4].copy_from_slice(&dport.to_be_bytes());
            l4[12] = 0x50;
            let f = ipv4(
                [2; 6],
                [4; 6],
                None,
                "10.0.1.10".parse().unwrap(),
                "198.18.0.9".parse().unwrap(),
                64,
                proto,
                &l4,
            );
            let slow = extract(&parse(&f).unwrap(), &f).unwrap().key;
            assert_eq!(plain_ipv4_l4(&f), Some(slow));
        }
        // Tagged, ICMP and short frames take the full parse.
        let tagged = ipv4(
            [2; 6],
            [4; 6],
            Some(7),
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            64,
            17,
            &[0; 8],
        );
        let icmp = ipv4(
            [2; 6],
            [4; 6],
            None,
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            64,
            1,
            &[8, 0, 0, 0, 0, 1, 0, 1],
        );
        assert_eq!(plain_ipv4_l4(&tagged), None);
        assert_eq!(plain_ipv4_l4(&icmp), None);
        assert_eq!(plain_ipv4_l4(&icmp[..20]), None);
    }
}
