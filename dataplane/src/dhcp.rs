//! DHCPv4 server stage: a client on a logical port with a bound MAC and
//! IPv4 address gets exactly that address (RFC 2131 DISCOVER → OFFER,
//! REQUEST → ACK, or NAK for any other address), with the switch's subnet
//! mask, its router's gateway, DNS servers, MTU and lease time from
//! [`crate::model::DhcpSpec`].
//!
//! The reply is built in place in the request's buffer and sent back out the
//! ingress interface (like the ARP responder): no allocation, no state. There
//! is no lease table because the address is the port's binding; a lease
//! never expires in the data plane's view and renewals are answered the same
//! way. Requests from ports without a binding are left to the rest of the
//! pipeline (an external DHCP server behind an uplink still works).
//!
//! Hand-written: the maintained DHCP crates (`dhcproto`) allocate per
//! message (`Vec` options, `HashMap`), which the per-packet path must not.

use std::net::Ipv4Addr;

use crate::counters::{DropReason, Outcome};
use crate::packet::checksum::{accumulate, finish, internet_checksum, pseudo};
use crate::packet::headers::{mac_to_string, Mac, IPPROTO_UDP};
use crate::packet::parse::{L3, L4};
use crate::packet::Parsed;
use crate::pipeline::{Decision, Tracer, Verdict};
use crate::tables::{Lport, Switch};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const BOOTP_LEN: usize = 236;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Fixed BOOTP part plus the magic cookie.
const FIXED_LEN: usize = BOOTP_LEN + 4;
/// Replies are padded to this BOOTP size (RFC 1542 minimum, some clients need it).
const MIN_BOOTP: usize = 300;
/// At most this many DNS servers are sent.
pub const MAX_DNS: usize = 4;

const OPT_PAD: u8 = 0;
const OPT_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE: u8 = 51;
const OPT_MSG_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_RENEWAL: u8 = 58;
const OPT_REBINDING: u8 = 59;
const OPT_END: u8 = 255;

pub const DISCOVER: u8 = 1;
pub const OFFER: u8 = 2;
pub const REQUEST: u8 = 3;
pub const ACK: u8 = 5;
pub const NAK: u8 = 6;

/// A switch's compiled DHCP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    pub lease_secs: u32,
    pub mtu: Option<u16>,
    pub dns: Vec<Ipv4Addr>,
    /// Server identifier and source address (the gateway, or the spec's
    /// `server_ip` on a switch without a router).
    pub server_ip: Ipv4Addr,
    /// Source MAC of replies (the gateway's, or a fixed local one).
    pub server_mac: Mac,
}

/// What a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRequest {
    pub msg_type: u8,
    pub requested: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    pub ciaddr: Ipv4Addr,
    pub chaddr: Mac,
    pub broadcast: bool,
}

/// Why a BOOTP message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    #[error("truncated BOOTP message")]
    Truncated,
    #[error("not a DHCP request (op, hardware type or magic cookie)")]
    NotDhcpRequest,
    #[error("no message type option")]
    NoMessageType,
    #[error("option runs past the message")]
    BadOption,
}

fn ip_at(b: &[u8], off: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(off..off + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

/// Reads a BOOTREQUEST (`bootp` = the UDP payload). Never reads past it.
pub fn parse_request(bootp: &[u8]) -> Result<ClientRequest, DhcpError> {
    let fixed = bootp.get(..FIXED_LEN).ok_or(DhcpError::Truncated)?;
    if fixed[0] != 1 || fixed[1] != 1 || fixed[2] != 6 || fixed[BOOTP_LEN..] != COOKIE {
        return Err(DhcpError::NotDhcpRequest);
    }
    let chaddr: Mac = fixed[28..34].try_into().map_err(|_| DhcpError::Truncated)?;
    let mut req = ClientRequest {
        msg_type: 0,
        requested: None,
        server_id: None,
        ciaddr: ip_at(fixed, 12).ok_or(DhcpError::Truncated)?,
        chaddr,
        broadcast: fixed[10] & 0x80 != 0,
    };
    let mut opts = bootp.get(FIXED_LEN..).unwrap_or(&[]);
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            OPT_PAD => {
                opts = rest;
                continue;
            }
            OPT_END => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first().ok_or(DhcpError::BadOption)?;
        let value = rest.get(..usize::from(len)).ok_or(DhcpError::BadOption)?;
        match (code, value) {
            (OPT_MSG_TYPE, [t]) => req.msg_type = *t,
            (OPT_REQUESTED_IP, v) if v.len() == 4 => req.requested = ip_at(v, 0),
            (OPT_SERVER_ID, v) if v.len() == 4 => req.server_id = ip_at(v, 0),
            _ => {}
        }
        opts = rest.get(usize::from(len)..).unwrap_or(&[]);
    }
    if req.msg_type == 0 {
        return Err(DhcpError::NoMessageType);
    }
    Ok(req)
}

/// What the server answers to `req` from a port bound to `bound`; `None`
/// when it stays silent (RELEASE, DECLINE, a REQUEST for another server).
pub fn answer(req: &ClientRequest, bound: Ipv4Addr, server: Ipv4Addr) -> Option<u8> {
    match req.msg_type {
        DISCOVER => Some(OFFER),
        REQUEST => {
            if req.server_id.is_some_and(|s| s != server) {
                return None;
            }
            let wanted = req.requested.unwrap_or(req.ciaddr);
            Some(if wanted == bound { ACK } else { NAK })
        }
        _ => None,
    }
}

/// Everything a reply carries besides the request's fields.
pub struct Reply<'a> {
    pub msg_type: u8,
    pub yiaddr: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub config: &'a DhcpConfig,
}

/// Small cursor over the reply's option area.
struct Opts<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Opts<'_> {
    fn put(&mut self, code: u8, value: &[u8]) -> Option<()> {
        let len = u8::try_from(value.len()).ok()?;
        let dst = self.buf.get_mut(self.at..self.at + 2 + value.len())?;
        dst[0] = code;
        dst[1] = len;
        dst[2..].copy_from_slice(value);
        self.at += 2 + value.len();
        Some(())
    }
}

/// Rewrites the request frame in `buf` (parsed as `p`) into the reply;
/// returns the new frame length. `None` (buffer untouched beyond what is
/// rewritten anyway) when the buffer is too small.
// per DHCP packet: no allocation; the request's fixed part is copied to the stack first.
pub fn write_reply(
    buf: &mut [u8],
    p: &Parsed,
    req: &ClientRequest,
    reply: &Reply,
) -> Option<usize> {
    let bootp_off = p.l4_offset + 8;
    let mut request: [u8; BOOTP_LEN] =
        buf.get(bootp_off..bootp_off + BOOTP_LEN)?.try_into().ok()?;
    let cfg = reply.config;
    let nak = reply.msg_type == NAK;
    // RFC 2131 4.1: a NAK and replies to clients asking for it are broadcast.
    let broadcast = nak || req.broadcast || reply.yiaddr.is_unspecified();
    let (eth_dst, ip_dst) = if broadcast {
        ([0xff; 6], Ipv4Addr::BROADCAST)
    } else {
        (req.chaddr, reply.yiaddr)
    };
    let ip_off = p.l3_offset;
    let udp_off = ip_off + 20;
    let new_bootp = udp_off + 8;

    // BOOTP fixed part: the request's with op, hops, secs, yiaddr, siaddr changed.
    request[0] = 2;
    request[3] = 0;
    request[8..10].fill(0);
    request[16..20].copy_from_slice(&reply.yiaddr.octets());
    request[20..24].fill(0);
    request[44..].fill(0); // sname, file
    buf.get_mut(new_bootp..new_bootp + BOOTP_LEN)?
        .copy_from_slice(&request);
    buf.get_mut(new_bootp + BOOTP_LEN..new_bootp + FIXED_LEN)?
        .copy_from_slice(&COOKIE);

    let mut o = Opts {
        buf: buf.get_mut(new_bootp + FIXED_LEN..)?,
        at: 0,
    };
    o.put(OPT_MSG_TYPE, &[reply.msg_type])?;
    o.put(OPT_SERVER_ID, &cfg.server_ip.octets())?;
    if !nak {
        o.put(OPT_LEASE, &cfg.lease_secs.to_be_bytes())?;
        o.put(OPT_RENEWAL, &(cfg.lease_secs / 2).to_be_bytes())?;
        o.put(OPT_REBINDING, &(cfg.lease_secs / 8 * 7).to_be_bytes())?;
        o.put(OPT_MASK, &reply.mask.octets())?;
        if let Some(r) = reply.router {
            o.put(OPT_ROUTER, &r.octets())?;
        }
        if !cfg.dns.is_empty() {
            let mut dns = [0u8; 4 * MAX_DNS];
            let n = cfg.dns.len().min(MAX_DNS);
            for (slot, ip) in dns.chunks_exact_mut(4).zip(cfg.dns.iter()) {
                slot.copy_from_slice(&ip.octets());
            }
            o.put(OPT_DNS, dns.get(..4 * n)?)?;
        }
        if let Some(mtu) = cfg.mtu {
            o.put(OPT_MTU, &mtu.to_be_bytes())?;
        }
    }
    *o.buf.get_mut(o.at)? = OPT_END;
    let mut bootp_len = FIXED_LEN + o.at + 1;
    if bootp_len < MIN_BOOTP {
        buf.get_mut(new_bootp + bootp_len..new_bootp + MIN_BOOTP)?
            .fill(0);
        bootp_len = MIN_BOOTP;
    }
    let udp_len = u16::try_from(8 + bootp_len).ok()?;
    let total = u16::try_from(20 + 8 + bootp_len).ok()?;

    // Ethernet: to the client from the server, VLAN tag (if any) kept.
    buf.get_mut(0..6)?.copy_from_slice(&eth_dst);
    buf.get_mut(6..12)?.copy_from_slice(&cfg.server_mac);
    // IPv4 header without options.
    let ip = buf.get_mut(ip_off..ip_off + 20)?;
    ip.copy_from_slice(&[
        0x45,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        64,
        IPPROTO_UDP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[12..16].copy_from_slice(&cfg.server_ip.octets());
    ip[16..20].copy_from_slice(&ip_dst.octets());
    let c = internet_checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    // UDP with its checksum over the pseudo header.
    let udp = buf.get_mut(udp_off..udp_off + 8)?;
    udp[0..2].copy_from_slice(&SERVER_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].fill(0);
    let sum = pseudo(
        &cfg.server_ip.octets(),
        &ip_dst.octets(),
        IPPROTO_UDP,
        usize::from(udp_len),
    );
    let sum = accumulate(sum, buf.get(udp_off..new_bootp + bootp_len)?);
    let c = match finish(sum) {
        0 => 0xffff,
        c => c,
    };
    buf.get_mut(udp_off + 6..udp_off + 8)?
        .copy_from_slice(&c.to_be_bytes());
    Some(new_bootp + bootp_len)
}

fn decided(verdict: Verdict, outcome: Option<Outcome>, learned: bool) -> Decision {
    Decision {
        verdict,
        outcome,
        learned,
    }
}

/// The pipeline hook: answers a DHCP request from a bound port on a switch
/// with DHCP; `None` lets the frame continue through the pipeline.
// per DHCP packet only: the first checks are a few compares on parsed fields.
#[allow(clippy::too_many_arguments)]
pub fn stage<T: Tracer>(
    sw: &Switch,
    lp: &Lport,
    p: &Parsed,
    buf: &mut [u8],
    len: &mut usize,
    learned: bool,
    tr: &mut T,
) -> Option<Decision> {
    let (
        Some(cfg),
        L3::Ipv4(ip),
        L4::Udp {
            dport: SERVER_PORT, ..
        },
    ) = (&sw.dhcp, p.l3, p.l4)
    else {
        return None;
    };
    let bound = lp.ips.iter().copied().find(|a| sw.subnet.contains(*a));
    let (Some(mac), Some(bound)) = (lp.mac, bound) else {
        tr.note("dhcp", || {
            format!(
                "port {:?} has no bound MAC/IPv4: not answered here",
                lp.name
            )
        });
        return None;
    };
    let udp_end = p.l3_offset + ip.total_len;
    let req = match buf.get(p.l4_offset + 8..udp_end).map(parse_request) {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            tr.note("dhcp", || format!("drop: {e}"));
            return Some(decided(
                Verdict::Drop(DropReason::MalformedDhcp),
                None,
                learned,
            ));
        }
        None => {
            return Some(decided(
                Verdict::Drop(DropReason::MalformedDhcp),
                None,
                learned,
            ))
        }
    };
    if req.chaddr != mac {
        tr.note("dhcp", || {
            format!(
                "drop: client hardware address {} is not the port's",
                mac_to_string(&req.chaddr)
            )
        });
        return Some(decided(
            Verdict::Drop(DropReason::DhcpNotAnswered),
            None,
            learned,
        ));
    }
    let Some(msg_type) = answer(&req, bound, cfg.server_ip) else {
        tr.note("dhcp", || {
            format!("message type {}: no answer", req.msg_type)
        });
        return Some(decided(
            Verdict::Drop(DropReason::DhcpNotAnswered),
            None,
            learned,
        ));
    };
    let reply = Reply {
        msg_type,
        yiaddr: if msg_type == NAK {
            Ipv4Addr::UNSPECIFIED
        } else {
            bound
        },
        mask: Ipv4Addr::from(crate::lpm::mask(sw.subnet.len)),
        router: sw.gateway.map(|g| g.ip),
        config: cfg,
    };
    match write_reply(buf, p, &req, &reply) {
        Some(n) => {
            *len = n;
            let (outcome, what) = match msg_type {
                OFFER => (Outcome::DhcpOffered, "OFFER"),
                ACK => (Outcome::DhcpAcked, "ACK"),
                _ => (Outcome::DhcpNaked, "NAK"),
            };
            tr.note("dhcp", || {
                format!(
                    "{what} {bound} to {} (lease {} s)",
                    mac_to_string(&mac),
                    cfg.lease_secs
                )
            });
            Some(decided(Verdict::Reply, Some(outcome), learned))
        }
        None => Some(decided(
            Verdict::Drop(DropReason::MalformedDhcp),
            None,
            learned,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;
    use crate::model::DhcpSpec;
    use crate::packet::build::ipv4;
    use crate::packet::parse;
    use crate::pipeline::{process, Learned, RecordTrace};
    use crate::testutil::{interfaces, topology};

    const VM1: Mac = [2, 0, 0, 0, 0, 1];
    const VM4: Mac = [2, 0, 0, 0, 0, 4];

    /// A client request as busybox udhcpc sends it (broadcast, from 0.0.0.0,
    /// client id, parameter request list, options padded).
    fn client_frame(chaddr: Mac, vlan: Option<u16>, msg: u8, extra: &[(u8, &[u8])]) -> Vec<u8> {
        let mut bootp = vec![0u8; BOOTP_LEN];
        bootp[0] = 1;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        bootp[28..34].copy_from_slice(&chaddr);
        bootp.extend_from_slice(&COOKIE);
        bootp.extend_from_slice(&[OPT_MSG_TYPE, 1, msg]);
        bootp.extend_from_slice(&[61, 7, 1]);
        bootp.extend_from_slice(&chaddr);
        for (code, value) in extra {
            bootp.push(*code);
            bootp.push(u8::try_from(value.len()).unwrap());
            bootp.extend_from_slice(value);
        }
        bootp.extend_from_slice(&[55, 4, 1, 3, 6, 26, OPT_END, 0, 0]);
        let mut udp = Vec::new();
        udp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
        udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
        udp.extend_from_slice(&u16::try_from(8 + bootp.len()).unwrap().to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&bootp);
        ipv4(
            [0xff; 6],
            chaddr,
            vlan,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            64,
            IPPROTO_UDP,
            &udp,
        )
    }

    fn tables(dns: &[&str]) -> crate::tables::Tables {
        let mut state = topology();
        for s in &mut state.switches {
            s.dhcp = Some(DhcpSpec {
                lease_secs: 3600,
                dns_servers: dns.iter().map(|d| d.to_string()).collect(),
                mtu: Some(1400),
                server_ip: None,
            });
        }
        compile(&state, &interfaces(), 1).unwrap()
    }

    /// Runs `frame` in on `in_port`; returns the decision, the reply and the trace.
    fn run(t: &crate::tables::Tables, in_port: u16, frame: &[u8]) -> (Decision, Vec<u8>, String) {
        let mut buf = vec![0u8; 2048];
        buf[..frame.len()].copy_from_slice(frame);
        let mut len = frame.len();
        let mut tr = RecordTrace::default();
        let d = process(
            t,
            &mut Learned::new(16),
            in_port,
            &mut buf,
            &mut len,
            &mut tr,
        );
        let trace = tr
            .steps
            .iter()
            .map(|s| format!("{}: {}", s.stage, s.decision))
            .collect::<Vec<_>>()
            .join("\n");
        (d, buf[..len].to_vec(), trace)
    }

    /// Options of a reply as (code, value) pairs, after checking IP and UDP checksums.
    type Options = Vec<(u8, Vec<u8>)>;

    fn reply_options(frame: &[u8]) -> (Parsed, Vec<u8>, Options) {
        let p = parse(frame).unwrap();
        let L3::Ipv4(ip) = p.l3 else {
            panic!("not IPv4")
        };
        assert_eq!(internet_checksum(&frame[p.l3_offset..p.l3_offset + 20]), 0);
        let udp = &frame[p.l4_offset..p.l3_offset + ip.total_len];
        let mut sum = accumulate(0, &ip.src.octets());
        sum = accumulate(sum, &ip.dst.octets());
        sum = accumulate(sum, &[0, IPPROTO_UDP]);
        sum = accumulate(sum, &u16::try_from(udp.len()).unwrap().to_be_bytes());
        assert_eq!(finish(accumulate(sum, udp)), 0, "UDP checksum");
        assert_eq!(
            p.l4,
            L4::Udp {
                sport: 67,
                dport: 68
            }
        );
        let bootp = udp[8..].to_vec();
        assert!(bootp.len() >= MIN_BOOTP);
        assert_eq!(bootp[0], 2, "BOOTREPLY");
        assert_eq!(bootp[4..8], 0x1234_5678u32.to_be_bytes(), "xid kept");
        assert_eq!(bootp[BOOTP_LEN..FIXED_LEN], COOKIE);
        let mut opts = Vec::new();
        let mut i = FIXED_LEN;
        while bootp[i] != OPT_END {
            let (code, len) = (bootp[i], usize::from(bootp[i + 1]));
            opts.push((code, bootp[i + 2..i + 2 + len].to_vec()));
            i += 2 + len;
        }
        (p, bootp, opts)
    }

    fn opt(opts: &[(u8, Vec<u8>)], code: u8) -> Option<Vec<u8>> {
        opts.iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn discover_gets_an_offer_of_the_bound_address() {
        let t = tables(&["198.18.0.53", "198.18.0.54"]);
        let (d, reply, trace) = run(&t, 0, &client_frame(VM1, None, DISCOVER, &[]));
        assert_eq!(d.verdict, Verdict::Reply, "{trace}");
        assert_eq!(d.outcome, Some(Outcome::DhcpOffered));
        assert!(trace.contains("dhcp: OFFER 10.0.1.10"), "{trace}");
        let (p, bootp, opts) = reply_options(&reply);
        assert_eq!(p.dst, VM1, "unicast to the client (no broadcast flag)");
        assert_eq!(p.src, [2, 0, 0, 0, 0xff, 1], "from the gateway MAC");
        assert_eq!(bootp[16..20], [10, 0, 1, 10], "yiaddr");
        assert_eq!(bootp[28..34], VM1, "chaddr");
        assert_eq!(opt(&opts, OPT_MSG_TYPE), Some(vec![OFFER]));
        assert_eq!(opt(&opts, OPT_SERVER_ID), Some(vec![10, 0, 1, 1]));
        assert_eq!(opt(&opts, OPT_MASK), Some(vec![255, 255, 255, 0]));
        assert_eq!(opt(&opts, OPT_ROUTER), Some(vec![10, 0, 1, 1]));
        assert_eq!(opt(&opts, OPT_LEASE), Some(3600u32.to_be_bytes().to_vec()));
        assert_eq!(opt(&opts, OPT_MTU), Some(1400u16.to_be_bytes().to_vec()));
        assert_eq!(
            opt(&opts, OPT_DNS),
            Some(vec![198, 18, 0, 53, 198, 18, 0, 54])
        );
    }

    #[test]
    fn request_for_the_bound_address_is_acked_and_others_are_naked() {
        let t = tables(&[]);
        let sid: &[u8] = &[10, 0, 1, 1];
        let good = client_frame(
            VM1,
            None,
            REQUEST,
            &[(OPT_REQUESTED_IP, &[10, 0, 1, 10]), (OPT_SERVER_ID, sid)],
        );
        let (d, reply, _) = run(&t, 0, &good);
        assert_eq!(d.outcome, Some(Outcome::DhcpAcked));
        let (_, bootp, opts) = reply_options(&reply);
        assert_eq!(opt(&opts, OPT_MSG_TYPE), Some(vec![ACK]));
        assert_eq!(bootp[16..20], [10, 0, 1, 10]);
        assert_eq!(opt(&opts, OPT_DNS), None, "no DNS configured");

        let wrong = client_frame(VM1, None, REQUEST, &[(OPT_REQUESTED_IP, &[10, 0, 1, 99])]);
        let (d, reply, trace) = run(&t, 0, &wrong);
        assert_eq!(d.outcome, Some(Outcome::DhcpNaked), "{trace}");
        let (p, bootp, opts) = reply_options(&reply);
        assert_eq!(opt(&opts, OPT_MSG_TYPE), Some(vec![NAK]));
        assert_eq!(opt(&opts, OPT_LEASE), None);
        assert_eq!(bootp[16..20], [0, 0, 0, 0]);
        assert_eq!(p.dst, [0xff; 6], "NAK is broadcast");

        // Selecting another server: stay silent.
        let other = client_frame(VM1, None, REQUEST, &[(OPT_SERVER_ID, &[10, 0, 1, 2])]);
        let (d, _, _) = run(&t, 0, &other);
        assert_eq!(d.verdict, Verdict::Drop(DropReason::DhcpNotAnswered));
    }

    #[test]
    fn vlan_switch_reply_keeps_the_tag() {
        let t = tables(&[]);
        let (d, reply, trace) = run(&t, 3, &client_frame(VM4, Some(100), DISCOVER, &[]));
        assert_eq!(d.verdict, Verdict::Reply, "{trace}");
        let (p, bootp, _) = reply_options(&reply);
        assert_eq!(p.vlan, Some(100));
        assert_eq!(bootp[16..20], [10, 0, 3, 10]);
    }

    #[test]
    fn unbound_ports_and_switches_without_dhcp_are_not_answered() {
        // The learning uplink has no binding: the request floods as before.
        let t = tables(&[]);
        let (d, _, trace) = run(
            &t,
            4,
            &client_frame([2, 0, 0, 0, 9, 9], None, DISCOVER, &[]),
        );
        assert!(matches!(d.verdict, Verdict::Flood { .. }), "{trace}");
        // No DHCP on the switch: flooded too.
        let plain = compile(&topology(), &interfaces(), 1).unwrap();
        let (d, _, _) = run(&plain, 0, &client_frame(VM1, None, DISCOVER, &[]));
        assert!(matches!(d.verdict, Verdict::Flood { .. }));
        // chaddr of another MAC from a bound port: not answered.
        let (d, _, _) = run(&t, 0, &{
            let mut f = client_frame([2, 0, 0, 0, 7, 7], None, DISCOVER, &[]);
            f[6..12].copy_from_slice(&VM1);
            f
        });
        assert_eq!(d.verdict, Verdict::Drop(DropReason::DhcpNotAnswered));
    }

    #[test]
    fn malformed_requests_are_dropped_not_panicked_on() {
        let t = tables(&[]);
        let good = client_frame(VM1, None, DISCOVER, &[]);
        // Every truncation of the BOOTP part, with IP/UDP lengths fixed up.
        for cut in (14 + 20 + 8)..good.len() {
            let mut f = good[..cut].to_vec();
            let ip_len = u16::try_from(cut - 14).unwrap();
            f[16..18].copy_from_slice(&ip_len.to_be_bytes());
            f[24..26].fill(0);
            let c = internet_checksum(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
            f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
            let (d, _, _) = run(&t, 0, &f);
            assert!(
                matches!(d.verdict, Verdict::Drop(_) | Verdict::Reply),
                "cut {cut}: {d:?}"
            );
        }
        assert_eq!(parse_request(&[0u8; 10]), Err(DhcpError::Truncated));
        let mut bad_opt = vec![0u8; FIXED_LEN];
        bad_opt[..3].copy_from_slice(&[1, 1, 6]);
        bad_opt[BOOTP_LEN..].copy_from_slice(&COOKIE);
        bad_opt.extend_from_slice(&[OPT_MSG_TYPE, 200]);
        assert_eq!(parse_request(&bad_opt), Err(DhcpError::BadOption));
    }

    #[test]
    fn bad_dhcp_config_is_rejected() {
        let mut state = topology();
        state.switches[0].dhcp = Some(DhcpSpec {
            dns_servers: vec!["not-an-ip".into()],
            ..DhcpSpec::default()
        });
        assert!(compile(&state, &interfaces(), 1).is_err());
        state.switches[0].dhcp = Some(DhcpSpec {
            mtu: Some(100),
            ..DhcpSpec::default()
        });
        assert!(matches!(
            compile(&state, &interfaces(), 1),
            Err(crate::config::ConfigError::BadDhcp { .. })
        ));
        // Old JSON without the field still parses.
        let s: crate::model::SwitchSpec =
            serde_json::from_str(r#"{"name":"x","subnet":"10.9.0.0/24"}"#).unwrap();
        assert_eq!(s.dhcp, None);
        let s: crate::model::SwitchSpec =
            serde_json::from_str(r#"{"name":"x","subnet":"10.9.0.0/24","dhcp":{}}"#).unwrap();
        assert_eq!(s.dhcp.unwrap().lease_secs, 86_400);
    }
}
