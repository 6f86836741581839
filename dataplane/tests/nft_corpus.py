#!/usr/bin/python3
"""Packet corpus of dataplane/tests/nft_compare.rs.

The test sends the same frames through keel's security groups and through
nftables and compares which arrive. This script derives the frames from the
rules of a keel desired state, deterministically (fixed seed):

- for every rule: its matches and near misses: port-range edges and their
  outside neighbours (of every range of a port set), the first and last
  address of the remote CIDR (of every prefix of an address group) and the
  addresses just outside it, remote-group members and their neighbours,
  other protocols, ICMP type/code one off;
- random background over the same addresses, ports and protocols;
- a few special cases: DHCP replies, ND, IPv4 options, IPv6 extension
  headers, ICMP conversations (see below).

Every frame is a connection's first packet (TCP: a SYN) and carries
b"KNFT" + its id (u32, big endian) as payload. No two frames share a
connection key in either direction (ICMP errors count their quoted flow), so
keel's connection tracking never decides one frame by an earlier one --
except in the "ICMP conversation" pairs, on purpose: a second ICMP type on
the key of an allowed first one must still be judged by the rules.

usage: nft_corpus.py STATE.json CLIENT_PORT SINK_PORT SRC_MAC DST_MAC OUT.pcap OUT.json
Writes the frames (pcap) and, per id, a case label and a readable summary (json).
"""
import ipaddress
import json
import random
import sys

from scapy.all import ICMP, IP, TCP, UDP, Ether, IPOption_RR, Raw, wrpcap
from scapy.layers.inet6 import (
    IPv6,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6Unknown,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
)

SEED = 7
MAGIC = b"KNFT"
PROTO_NUM = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58}
# Protocols a near miss or background frame may use besides the rule's own
# (GRE, SCTP, experimental 253 carry no ports keel or nftables look at).
OTHER_PROTOS = {False: [6, 17, 1, 47, 132, 253], True: [6, 17, 58, 47, 132, 253]}


def proto_of(rule):
    p = (rule.get("protocol") or "any").lower()
    if p == "any":
        return None
    return PROTO_NUM.get(p, None if not p.isdigit() else int(p))


def port_range(rule):
    lo, hi = rule.get("port_min"), rule.get("port_max")
    if lo is None and hi is None:
        return None
    return (lo if lo is not None else 0, hi if hi is not None else lo)


class Corpus:
    def __init__(self, state, client_port, sink_port, src_mac, dst_mac):
        self.rng = random.Random(SEED)
        self.src_mac, self.dst_mac = src_mac, dst_mac
        ports = {p["name"]: p for p in state.get("ports", [])}
        self.groups = {g["name"]: g for g in state.get("security_groups", [])}
        self.members = {
            name: [a for p in g.get("ports", []) for a in ports[p].get("ips", [])]
            for name, g in self.groups.items()
        }
        self.address_groups = {
            g["name"]: [ipaddress.ip_network(a) for a in g.get("addresses", [])]
            for g in state.get("address_groups", [])
        }
        self.port_sets = {
            s["name"]: [(r["min"], r["max"]) for r in s.get("ports", [])]
            for s in state.get("port_sets", [])
        }
        self.sink_ips = {False: [], True: []}
        for a in ports[sink_port].get("ips", []):
            self.sink_ips[":" in a].append(a)
        self.sink_ips[False] = self.sink_ips[False] or ["10.0.1.11"]
        self.sink_ips[True] = self.sink_ips[True] or ["fd00:1::11"]
        self.rules = [
            (g["name"], i, r)
            for g in state.get("security_groups", [])
            for i, r in enumerate(g.get("rules", []))
        ]
        # Address pools per family: every edge the rules name.
        self.pool = {False: set(), True: set()}
        for _, _, r in self.rules:
            for a in self.remote_candidates(r):
                self.pool[a.version == 6].add(a)
        self.pool[False] |= {ipaddress.ip_address(a) for a in ["192.0.2.1", "198.18.7.7"]}
        self.pool[True] |= {ipaddress.ip_address(a) for a in ["fd00:77::1", "2001:db8::1"]}
        self.pool = {k: sorted(v) for k, v in self.pool.items()}
        self.port_pool = sorted(
            {p for _, _, r in self.rules for p in self.port_candidates(r)} | {80, 443, 8080}
        )
        self.frames, self.meta, self.keys = [], [], set()
        self.client_port, self.sink_port = client_port, sink_port

    # --- candidate values -------------------------------------------------
    def remote_candidates(self, r):
        v6 = r.get("ethertype") == "ipv6"
        out = []
        nets = []
        if r.get("remote_cidr"):
            nets = [ipaddress.ip_network(r["remote_cidr"], strict=False)]
        elif r.get("remote_address_group"):
            nets = [n for n in self.address_groups.get(r["remote_address_group"], []) if (n.version == 6) == v6]
        for net in nets:
            first, last = net[0], net[-1]
            out += [first, last]
            if int(first) > 0:
                out.append(first - 1)
            if int(last) < (2**128 - 1 if v6 else 2**32 - 1):
                out.append(last + 1)
            for _ in range(2):
                out.append(net[self.rng.randrange(net.num_addresses)])
        if r.get("remote_group"):
            for a in self.members.get(r["remote_group"], []):
                a = ipaddress.ip_address(a)
                if (a.version == 6) == v6:
                    out += [a, a - 1, a + 1]
        return out

    def in_remote(self, r, a):
        """Whether address `a` is inside the rule's remote (CIDR or group)."""
        if r.get("remote_cidr"):
            return a in ipaddress.ip_network(r["remote_cidr"], strict=False)
        if r.get("remote_group"):
            return str(a) in self.members.get(r["remote_group"], [])
        if r.get("remote_address_group"):
            return any(a in n for n in self.address_groups.get(r["remote_address_group"], []) if n.version == a.version)
        return True

    def port_ranges(self, r):
        """The rule's destination port ranges; None when it names none."""
        if r.get("port_set"):
            return self.port_sets.get(r["port_set"], [])
        pr = port_range(r)
        return None if pr is None else [pr]

    def in_ports(self, r, port):
        ranges = self.port_ranges(r)
        return ranges is None or any(lo <= port <= hi for lo, hi in ranges)

    def port_candidates(self, r):
        ranges = self.port_ranges(r)
        if ranges is None:
            return []
        out = set()
        for lo, hi in ranges:
            out |= {lo, hi, self.rng.randint(lo, hi)}
            if lo > 0:
                out.add(lo - 1)
            if hi < 65535:
                out.add(hi + 1)
        return sorted(out)

    def any_addr(self, v6):
        return self.rng.choice(self.pool[v6])

    # --- frames -----------------------------------------------------------
    def add(self, case, v6, src, dst, proto, dport=None, icmp=None, ext=None, options=False, sport=None,
            icmp_id=None, follows=False):
        """Adds one frame unless its connection key is taken (or it `follows`
        the frame that took it, on purpose); returns whether added."""
        fid = len(self.frames)
        tag = Raw(MAGIC + fid.to_bytes(4, "big"))
        src, dst = str(src), str(dst)
        flow_sport = 0
        if proto in (6, 17):
            flow_sport = sport if sport is not None else 20000 + fid
            flow = (src, dst, proto, flow_sport, dport)
        elif icmp is not None and icmp[0] in ((128, 129) if v6 else (8, 0)):
            echo_id = icmp_id if icmp_id is not None else 1000 + fid
            flow = (src, dst, proto, echo_id, echo_id)
        else:
            flow = (src, dst, proto, 0, 0)
        quoted = None
        if not v6 and icmp is not None and icmp[0] in (3, 4, 5, 11, 12):
            # The error quotes a flow of the sink towards the sender.
            quoted = (dst, src, 17, 33000 + fid, 33000 + fid)
        taken = [flow, (flow[1], flow[0], flow[2], flow[4], flow[3])]
        if quoted:
            taken += [quoted, (quoted[1], quoted[0], 17, quoted[4], quoted[3])]
        if not follows and any(k in self.keys for k in taken):
            return False
        self.keys.update(taken)

        l3 = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, options=[IPOption_RR()] if options else [])
        if ext == "dstopt":
            l3 = l3 / IPv6ExtHdrDestOpt()
        elif ext == "hbh":
            l3 = l3 / IPv6ExtHdrHopByHop()
        if proto == 6:
            l4 = TCP(sport=flow_sport, dport=dport, flags="S") / tag
            what = f"tcp {src}:{flow_sport} > {dst}:{dport} [SYN]"
        elif proto == 17:
            l4 = UDP(sport=flow_sport, dport=dport) / tag
            what = f"udp {src}:{flow_sport} > {dst}:{dport}"
        elif proto == 1:
            t, c = icmp
            if quoted:
                l4 = ICMP(type=t, code=c) / IP(src=quoted[0], dst=quoted[1]) / UDP(sport=quoted[3], dport=quoted[4]) / tag
            elif t in (8, 0):
                l4 = ICMP(type=t, code=c, id=flow[3]) / tag
            else:
                l4 = ICMP(type=t, code=c) / tag
            what = f"icmp {src} > {dst} type {t} code {c}"
        elif proto == 58:
            t, c = icmp
            if t == 128:
                l4 = ICMPv6EchoRequest(id=flow[3], code=c, data=bytes(tag))
            elif t == 129:
                l4 = ICMPv6EchoReply(id=flow[3], code=c, data=bytes(tag))
            else:
                l4 = ICMPv6Unknown(type=t, code=c, msgbody=bytes(tag))
            what = f"icmpv6 {src} > {dst} type {t} code {c}"
        else:
            l4 = tag
            what = f"ip proto {proto} {src} > {dst}"
        if not v6 and proto != 58:
            l3.proto = proto
        elif v6 and ext is None:
            l3.nh = proto
        family = "IPv6" if v6 else "IPv4"
        if ext:
            what += f" (behind a {ext} extension header)"
        if options:
            what += " (IPv4 options)"
        self.frames.append(Ether(src=self.src_mac, dst=self.dst_mac) / l3 / l4)
        self.meta.append({"id": fid, "case": case, "summary": f"{family} {what}"})
        return True

    def rule_frames(self, group, idx, r):
        """Matches and near misses of one rule."""
        v6 = r.get("ethertype") == "ipv6"
        ingress = r["direction"] == "ingress"
        proto = proto_of(r)
        remotes = self.remote_candidates(r) or [self.any_addr(v6) for _ in range(3)]
        ports = self.port_candidates(r) or [self.rng.choice(self.port_pool)]
        # Matches vary one field at a time: an address edge with a port
        # inside the range, a port edge from an address inside the remote.
        inside = [a for a in remotes if self.in_remote(r, a)] or remotes
        in_ports = [p for p in ports if self.in_ports(r, p)] or ports
        label = f"{group} rule {idx} ({r['direction']}, prio {r.get('priority', 0)}, {r.get('action', 'allow')})"

        def local():
            # The end the rule does not look at. Ingress: the sink (mostly).
            # Egress: a source the sink's probe rule lets in, so the egress
            # verdict is what decides.
            if ingress:
                if self.rng.random() < 0.8:
                    return self.rng.choice(self.sink_ips[v6])
                return self.any_addr(v6)
            return ipaddress.ip_address("fd00:61::" if v6 else "10.61.0.0") + self.rng.randint(1, 250)

        def one(remote, p, port, icmp, what):
            src, dst = (remote, local()) if ingress else (local(), remote)
            for _ in range(20):
                if self.add(f"{label}: {what}", v6, src, dst, p, port, icmp):
                    return
                # Key taken: another local end (ingress) or source (egress).
                if ingress:
                    dst = self.any_addr(v6)
                else:
                    src = local()

        def icmp_variants():
            t, c = r.get("icmp_type"), r.get("icmp_code")
            if t is None:
                return [((8 if not v6 else 128), 0), ((13 if not v6 else 137), 0)]
            out = [(t, c if c is not None else 0), (max(t - 1, 0), c or 0), (min(t + 1, 255), c or 0)]
            if c is not None:
                out += [(t, max(c - 1, 0)), (t, min(c + 1, 255))]
            else:
                out.append((t, 1))
            return out

        icmp_p = 58 if v6 else 1
        for remote in remotes:
            if proto in (6, 17):
                one(remote, proto, self.rng.choice(in_ports), None, f"remote {remote}")
            elif proto == icmp_p:
                icmp = icmp_variants()[0] if remote in inside else self.rng.choice(icmp_variants())
                one(remote, proto, None, icmp, f"remote {remote}")
            else:
                p = proto if proto is not None else self.rng.choice(OTHER_PROTOS[v6])
                port = self.rng.choice(self.port_pool) if p in (6, 17) else None
                icmp = (self.rng.choice([8, 13, 3]), 0) if p == 1 else ((self.rng.choice([128, 137]), 0) if p == 58 else None)
                one(remote, p, port, icmp, f"remote {remote}, proto {p}")
        if proto in (6, 17):
            for port in ports:
                one(self.rng.choice(inside), proto, port, None, f"dport {port}")
        if proto == icmp_p:
            for icmp in icmp_variants():
                one(self.rng.choice(inside), proto, None, icmp, f"icmp {icmp}")
        # Other protocols at the same remote and port.
        for p in self.rng.sample([q for q in OTHER_PROTOS[v6] if q != proto], 2):
            port = self.rng.choice(ports) if p in (6, 17) else None
            icmp = ((8, 0) if not v6 else (128, 0)) if p == icmp_p else None
            one(self.rng.choice(remotes), p, port, icmp, f"other protocol {p}")
        # The other family: never matches this rule.
        other = not v6
        self.add(f"{label}: other family", other, self.any_addr(other), self.rng.choice(self.sink_ips[other]), 6, self.rng.choice(ports))

    def background(self, n):
        for _ in range(n):
            v6 = self.rng.random() < 0.3
            p = self.rng.choice(OTHER_PROTOS[v6])
            port = self.rng.choice(self.port_pool) if p in (6, 17) else None
            icmp = None
            if p == 1:
                icmp = self.rng.choice([(8, 0), (0, 0), (3, 3), (3, 4), (11, 0), (13, 0), (13, 1), (17, 0)])
            elif p == 58:
                icmp = self.rng.choice([(128, 0), (129, 0), (1, 0), (137, 0)])
            dst = self.rng.choice(self.sink_ips[v6]) if self.rng.random() < 0.6 else self.any_addr(v6)
            self.add("background", v6, self.any_addr(v6), dst, p, port, icmp)

    def specials(self):
        sink4, sink6 = self.sink_ips[False][0], self.sink_ips[True][0]
        rnd = lambda v6: self.any_addr(v6)  # noqa: E731
        # DHCP replies are let in without rules; requests are not.
        self.add("implicit: DHCP reply", False, "10.0.1.1", sink4, 17, 68, sport=67)
        self.add("implicit: DHCP request direction (not a reply)", False, "10.0.1.2", sink4, 17, 67, sport=68)
        self.add("implicit: DHCPv6 reply", True, "fd00:1::1", sink6, 17, 546, sport=547)
        # Neighbor discovery and router adverts pass; a redirect does not.
        for t in (133, 134, 135, 136, 137):
            self.add(f"implicit: ICMPv6 type {t}", True, rnd(True), sink6, 58, icmp=(t, 0))
        # IPv4 options must not move the transport header keel and nft read.
        for port in (8049, 8050, 8055, 8099, 8100):
            self.add("IPv4 options", False, ipaddress.ip_address("10.20.5.9") + port % 7, sink4, 6, port, options=True)
        # IPv6 extension headers: the transport protocol is behind them.
        for ext in ("dstopt", "hbh"):
            self.add("IPv6 ext header", True, "fd00:61::5", sink6, 6, 22, ext=ext)
            self.add("IPv6 ext header", True, "fd00:aa::7", sink6, 6, 443, ext=ext)
            self.add("IPv6 ext header", True, "fd00:aa:bb::7", sink6, 6, 443, ext=ext)
            self.add("IPv6 ext header", True, "fd00:99::9", sink6, 17, 1500, ext=ext)
            self.add("IPv6 ext header", True, "fd00:61::6", "fd00:dead::1", 17, 1500, ext=ext)
        # ICMP conversations: an allowed ICMP message, then another type
        # between the same hosts (same echo id) that no rule allows. Tracking
        # the first must not let the second in.
        pairs = [
            (False, "10.40.0.9", (13, 0), (17, 0)),  # timestamp, then address mask
            (False, "10.40.0.10", (13, 0), (5, 1)),  # timestamp, then a redirect (error)
            (False, "10.9.9.9", (8, 0), (0, 0)),  # echo request, then an echo reply
            (True, "fd00:5::9", (128, 0), (129, 0)),
        ]
        for v6, src, first, second in pairs:
            dst = self.sink_ips[v6][0]
            proto = 58 if v6 else 1
            echo_id = 4242 + len(self.frames)
            self.add("ICMP conversation: allowed opener", v6, src, dst, proto, icmp=first, icmp_id=echo_id)
            self.add(f"ICMP conversation: type {second[0]} after type {first[0]}", v6, src, dst, proto,
                     icmp=second, icmp_id=echo_id, follows=True)


def main():
    state_path, client_port, sink_port, src_mac, dst_mac, pcap_out, json_out = sys.argv[1:8]
    with open(state_path) as f:
        state = json.load(f)
    c = Corpus(state, client_port, sink_port, src_mac, dst_mac)
    for group, idx, r in c.rules:
        c.rule_frames(group, idx, r)
    c.background(120)
    c.specials()
    wrpcap(pcap_out, c.frames)
    with open(json_out, "w") as f:
        json.dump(c.meta, f, indent=1)


if __name__ == "__main__":
    main()
