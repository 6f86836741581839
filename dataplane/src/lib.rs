//! keel's VPC data plane: logical switches per subnet, a distributed IPv4
//! router, and the ports that connect them to VMs and uplinks.
//!
//! # Design
//!
//! - **One declarative interface.** The control plane sends a whole
//!   [`model::DesiredState`] (switches, ports with MAC/IP bindings and port
//!   security, routers with gateway ports and static routes), from a JSON file
//!   or over the unix-socket protocol in [`control`]. [`config::compile`]
//!   validates it (duplicate MAC/IP, overlapping router subnets, unknown
//!   references, bad CIDRs/VLANs …) and compiles immutable [`tables::Tables`];
//!   an invalid state is rejected with a precise [`config::ConfigError`] and the
//!   running tables stay.
//! - **RCU publication.** Tables are swapped with `arc-swap`; a worker loads
//!   the current pointer once per batch and keeps forwarding during an apply.
//!   State a worker learns (MACs) is tagged with the tables' generation and
//!   flushed when it changes.
//! - **Pipeline** ([`pipeline::process`]): parse ([`packet`], `zerocopy`
//!   headers, bounds-checked) → ingress (interface + VLAN → logical port) →
//!   port security → MAC learning → ARP responder (bindings and gateways,
//!   answered in place, never flooded) → router (LPM [`lpm::Lpm`], TTL
//!   decrement with RFC 1624 checksum update, ECMP over static next hops by
//!   5-tuple hash, next-hop MAC from bindings, VLAN
//!   tag push/pop, ICMP time-exceeded / net-unreachable / gateway echo built
//!   in place) or L2 forward (bound MACs, learned MACs, flood within the switch
//!   but never back out the ingress interface). A DHCPv4 server stage
//!   ([`dhcp`]) answers bound ports in place before the ARP responder. Every drop has a reason
//!   ([`counters::DropReason`]) counted per interface, every outcome a counter.
//! - **Stateful services** ([`stateful`], [`nat`], [`conntrack`],
//!   [`security`]): a per-worker connection table with zones; security groups
//!   per port (`security_group_out` after port security, `security_group_in`
//!   before delivery to a port, for switched and routed traffic); the
//!   router's NAT (SNAT with per-connection port allocation, DNAT port
//!   forwarding, floating IPs) and firewall stage around the route lookup.
//!   Rules are compiled into the immutable tables at apply time (address
//!   groups and port sets as sorted interval sets, one binary search each
//!   per new connection); a
//!   configuration change re-checks each tracked connection once, on its next
//!   packet, and cuts those now denied. Per-rule hit counters:
//!   `{"op":"rule_stats"}`; one zone's connections are flushed with
//!   `{"op":"ct_flush","port":"vm1"}` (or `"router"`).
//! - **L4 load balancing** ([`lb4`]): a VIP:port (TCP or UDP) on a router
//!   spread over member addresses by Maglev consistent hashing
//!   ([`maglev`], tables built at apply time, members named by address so a
//!   member change only remaps its own share). The first packet of a
//!   connection is DNATed to the picked member in the router's NAT stage and
//!   tracked in the router's zone, so every later packet (replies un-DNATed
//!   back to the VIP) follows the connection, not the table: affinity
//!   survives member changes. DNAT only: members see the client's address
//!   and answer through the router (their gateway). Per-member new-flow and
//!   packet counters: `{"op":"lb_stats"}`; the trace shows the `lb` stage.
//! - **Network services** (same desired state, same apply): QoS
//!   ([`qos`]: per-port and per-floating-IP token-bucket meters, ingress and
//!   egress, that drop over the rate, and DSCP marking per port; buckets are per worker, lock-free, and
//!   survive an apply that keeps their rate; `{"op":"qos_stats"}`), traffic
//!   mirroring ([`mirror`]: sessions on ports, in/out/both, protocol/CIDR
//!   filter, to a local port or a GRE/ERSPAN type II collector, copies taken
//!   by the engine around the pipeline so they are byte-identical;
//!   `{"op":"mirror_stats"}`) and stateful NAT64 on routers ([`nat64`]:
//!   RFC 6146 sessions in the connection table, RFC 7915 header translation,
//!   IPv4 pool), router policies ([`policy`]: allow/drop/reroute by
//!   ingress switch, CIDRs and protocol, for service chains;
//!   `{"op":"policy_stats"}`). Their decisions appear in the trace (`qos_out`, `qos_in`,
//!   `nat64`, `router_policy`) and in the drop/outcome counters (`qos_meter_dropped`,
//!   `nat64_no_session`, `nat64_translated_6to4` …).
//! - **Overlay between hosts** ([`overlay`]): switches stretched over an
//!   IPv4 underlay with Geneve (default, UDP 6081) or VXLAN (UDP 4789), a
//!   VNI per switch, the local tunnel endpoint on one underlay interface,
//!   and a remote port location table (ports on other hosts with their
//!   MAC/IP bindings and endpoint), so ARP/ND are answered locally and
//!   routing between subnets happens on the sending host (then the frame is
//!   encapsulated with the destination switch's VNI). Encapsulation is a
//!   verdict ([`pipeline::Verdict::Tunnel`], cacheable like the others): the
//!   engine writes the 50-byte outer header in front of the frame as it
//!   copies it into the transmit buffer (no allocation), the UDP source port
//!   from the flow hash. Floods on an overlay switch are replicated head-end
//!   to each endpoint holding a port of it. Frames for the local endpoint
//!   are validated, stripped and delivered to local ports only (a frame
//!   out of a tunnel never goes back into one: `overlay_loop`); the
//!   flow cache sees them after the strip, keyed on the inner frame and
//!   the VNI's tunnel port. **MTU:**
//!   encapsulation adds 50 bytes (outer Ethernet 14 + IPv4 20 + UDP 8 +
//!   Geneve/VXLAN 8; Geneve options are not sent), so with underlay MTU
//!   1500 the inner MTU is 1450 (1446 on a VLAN switch). A larger IPv4
//!   packet with DF is answered with ICMP "fragmentation needed" (MTU 1450)
//!   and an IPv6 one with ICMPv6 "packet too big", from the sender's
//!   gateway, so path MTU discovery works; otherwise it is a counted
//!   `overlay_too_big` drop. Trace stages `overlay_encap` (VNI, remote
//!   endpoint) and `overlay_decap`; outcomes `overlay_encap`,
//!   `overlay_decap`, `icmp_frag_needed_sent`, `icmp6_packet_too_big_sent`;
//!   drops `overlay_not_for_us`, `overlay_malformed`, `overlay_unknown_vni`,
//!   `overlay_loop`, `overlay_too_big`.
//! - **Flow cache** ([`flowcache`]): per worker, in front of the pipeline;
//!   exact match on (in-port, length, first 64 frame bytes) → the verdict and
//!   the rewritten header bytes. Fixed size (16k entries, 2-way set
//!   associative, oldest way evicted), filled only where a replay is exactly
//!   the slow path (IPv4 TCP/UDP/ICMP without options, no DHCP, unicast,
//!   flood or drop, same length; never while stateful, QoS, policy or NAT64
//!   stages are configured). Entries of an older tables generation or an
//!   older learned-MAC table miss. Counters in `stats.flow_cache`;
//!   `--flow-cache-entries 0` switches it off.
//! - **Trace** ([`control::Request::Trace`]): the same `process` with a
//!   recording [`pipeline::Tracer`], like `ovn-trace`; forwarding uses the
//!   no-op tracer, which compiles away.
//! - **Ports** ([`port::Port`]): batch rx/tx over pre-allocated buffers. The
//!   [`afpacket`] backend (TPACKET_V3 rx ring, `sendmmsg` tx) serves veth/TAP;
//!   [`port::MemPort`] is the benchmark generator/sink; keel-vhost's
//!   vhost-user-net NICs implement the same trait (passed to
//!   [`daemon::run_with_ports`] by `keel dataplane --vhost-user-net`); DPDK is
//!   meant to.
//!
//! # Usage
//!
//! `keel dataplane --interface dp0 --interface dp1 --config state.json --socket /run/keel-dp.sock`
//! (or the `keel-dataplane` binary with the same options) runs in the
//! namespace holding the interfaces. Requests are JSON lines on the socket:
//! `{"op":"apply","state":{…}}`, `{"op":"get"}`, `{"op":"stats"}`,
//! `{"op":"trace","interface":"dp0","packet":{"eth_src":…,"eth_dst":…,"ip_src":…,"ip_dst":…}}`
//! (or `"frame_hex"`); [`control::request`] is the client.
//!
//! Stateful services are more fields of the same state, e.g.
//! `"security_groups":[{"name":"web","ports":["vm1"],"rules":[{"direction":"ingress","protocol":"tcp","port_min":80,"remote_cidr":"10.0.0.0/8"}]}]`,
//! `"address_groups":[{"name":"admins","addresses":["10.9.0.0/16","fd00:9::/64"]}]` and
//! `"port_sets":[{"name":"web","ports":[{"min":80,"max":80},{"min":8000,"max":8099}]}]`
//! named by rules as `"remote_address_group":"admins","port_set":"web"`,
//! `"nat":[{"router":"r","type":"snat","external_ip":"198.18.0.1","logical_ip":"10.0.1.0/24"},
//! {"router":"r","type":"dnat_and_snat","external_ip":"198.18.0.50","logical_ip":"10.0.1.10"},
//! {"router":"r","type":"dnat","external_ip":"198.18.0.1","protocol":"tcp","external_port":8080,"logical_ip":"10.0.1.11","logical_port":80}]`,
//! `"firewall":[{"router":"r","protocol":"tcp","dst_cidr":"10.0.2.0/24","port_min":22,"action":"deny"}]`.
//!
//! Network services likewise:
//! `"qos":[{"port":"vm1","egress":{"rate_kbps":100000,"burst_bytes":250000},"dscp":46}]`,
//! `"mirrors":[{"name":"tap","ports":["vm1"],"direction":"both","filter":{"protocol":"icmp"},
//! "target":{"type":"erspan","interface":"dp2","src_mac":"02:00:00:00:00:fe","dst_mac":"02:00:00:00:00:12","src_ip":"198.18.0.1","dst_ip":"198.18.0.2","session_id":7}}]`
//! (or `"target":{"type":"port","port":"collector"}`),
//! `"nat64":[{"router":"r","pool":["198.18.1.100"]}]` (prefix `64:ff9b::/96` unless `"prefix"` is given),
//! `"router_policies":[{"router":"r","priority":100,"from_switch":"a","dst_cidr":"10.0.2.0/24","action":"reroute","next_hop":"10.0.3.10"}]`.
//! L4 load balancers:
//! `"load_balancers":[{"name":"web","router":"r","vip":"10.0.1.100","protocol":"tcp","port":80,
//! "members":[{"ip":"10.0.2.21","port":8080,"weight":1},{"ip":"10.0.2.22","port":8080,"weight":2}]}]`
//! (weight 0 drains a member: no new connections, its open ones stay).
//! The overlay (one per data plane; the underlay interface carries no
//! logical port):
//! `"overlay":{"interface":"ul0","local_ip":"198.18.0.1","local_mac":"02:00:00:00:aa:01",
//! "encapsulation":"geneve","mtu":1500,"switches":[{"switch":"a","vni":100}],
//! "endpoints":[{"ip":"198.18.0.2","mac":"02:00:00:00:aa:02"}],
//! "remote_ports":[{"name":"vm7","switch":"a","endpoint":"198.18.0.2","mac":"02:00:00:00:01:20","ips":["10.0.1.20","fd00:1::20"]}]}`.
//!
//! # Threading model
//!
//! `--workers N` worker threads ([`engine::Worker`], default 1), each pinned
//! to one of the allowed CPUs (round robin) when N > 1. Each worker owns
//! one socket per interface (AF_PACKET: the N sockets of an interface form
//! one `PACKET_FANOUT_HASH` group, so the kernel spreads frames over them),
//! its own buffers, connection table, flow cache, learned MACs, QoS buckets
//! and counters, and runs each batch of up to 32 frames to completion: no
//! allocation, no lock and no syscall per packet (one `sendmmsg` per output
//! port per batch; a `poll(2)` only when every port was idle). All workers
//! read the same RCU-published tables. Counters are plain per-worker arrays
//! folded into shared atomics once per round, so every control op
//! (`stats`, `rule_stats`, `qos_stats`, `mirror_stats`, `policy_stats`, `lb_stats`)
//! reports sums over workers; `stats.workers` has each worker's own
//! (`processed`, `handed_off`, `handed_in`, `handoff_full`,
//! `conntrack_entries`), and `ct_flush` is run by every worker. The control
//! socket runs on other threads and only touches the `ArcSwap` and the
//! atomics.
//!
//! **Steering.** Stateful stages need both directions of a connection on
//! one worker. No fanout mode gives that: `PACKET_FANOUT_HASH` uses the
//! kernel's flow hash (symmetric for software-hashed veth traffic, but not
//! for NIC RSS hashes, with a per-boot seed we cannot reproduce, and blind
//! to NAT), CPU/QM/LB follow the sender, and an eBPF fanout program would
//! still not know NAT sessions. So every frame's owner is computed in
//! software ([`steer::frame_worker`]: a symmetric hash of the flow's inside
//! view; DNAT/floating IPs mapped back statically; SNAT and NAT64 choose
//! ports whose replies hash back to the creating worker, VPP NAT44-ED's
//! scheme), and a frame that arrived on another worker's socket is handed
//! over through a pre-allocated lock-free ring ([`handoff`], VPP's handoff:
//! the buffer moves, nothing is copied or allocated). The hash fanout still
//! matters: it keeps each flow direction on one socket, so handed-over
//! frames stay in order. Learned MACs are shared over the same lanes, so a
//! frame towards a MAC another worker learned is not flooded.
//!
//! Rule hit counters (security groups, firewall) are relaxed atomics in the
//! tables, bumped only when rules are evaluated (first packets), not per
//! packet; they restart at zero with each apply.
//!
//! # Assumptions
//!
//! - Frames fit a 2048-byte buffer (MTU 1500 + tags); larger ones are counted
//!   as `oversize` drops. No GSO/TSO and no checksum offload: endpoints on veth
//!   must run `ethtool -K <if> tx off` (no `PACKET_VNET_HDR` support yet).
//! - At most 64 interfaces per data plane. Several workers need AF_PACKET
//!   ports (vhost-user-net NICs are single-queue: `--workers 1` with them).
//!   With N workers about (N-1)/N of the frames cross a handoff lane (the
//!   kernel's fanout hash cannot agree with ours); a full lane drops the
//!   frame (`handoff_full`).
//! - QoS meters are per worker: one flow is policed exactly, but a port whose
//!   flows spread over N workers may get up to N × its rate (no shared
//!   token pool yet). Mirror ERSPAN sequence numbers are per worker.
//! - Next hops are resolved from bindings; hosts without one (an uplink's
//!   far side) by ARP: the packet towards an unknown one becomes the
//!   router's broadcast request (one a second; the sender retransmits).
//!   Learned neighbors are shared between workers with their
//!   confirmations, probed by unicast ARP once their own ARP is 30 s old
//!   (still used meanwhile) and forgotten after 45 s of silence (Linux's
//!   STALE/PROBE, simplified: no probe delay, every neighbor is probed, used
//!   or not). IPv4 only: IPv6 neighbors come from bindings.
//! - Stateful services: conntrack keys hold IPv6 addresses and security
//!   groups filter IPv6, but NAT and the router firewall are IPv4 only (no
//!   hairpin to a VM's own floating IP; IPv6 clients reach IPv4 through
//!   [`nat64`]); non-first fragments are not
//!   tracked (dropped on ports with groups); flooded frames are filtered on
//!   the sending port only. The trace runs a fresh connection table, so it
//!   shows the decision for a connection's first packet.
//! - L4 load balancers are IPv4 only, without health checks of their own
//!   (the control plane sends the member set it wants) and without hairpin:
//!   a client on the subnet of the member it is sent to is answered directly
//!   at L2, bypassing the un-DNAT. With several workers a member removed
//!   outright loses its open connections (their replies no longer steer to
//!   the worker holding them); drain it with weight 0 first.
//! - QoS meters police, they do not shape (no queueing); flooded frames are
//!   not metered. Mirror copies to an ERSPAN
//!   collector add 50 bytes: its link needs MTU ≥ 1550 for full-size frames.
//! - Overlay: IPv4 underlay only; the underlay next-hop MAC of each
//!   endpoint is configured (static; ARP requests for the local endpoint
//!   address are answered, but the data plane does not ask). Inner IPv4
//!   packets without DF that do not fit are dropped (no fragmentation);
//!   switches without a router have no address to send ICMP errors from
//!   (also counted drops). Received UDP checksums are not verified (Linux
//!   sends 0 over IPv4; the inner frame carries its own checksums);
//!   non-critical Geneve options are skipped, critical ones and OAM frames
//!   dropped. With several workers, tunnel frames to the local endpoint
//!   are steered by their inner frame ([`steer`]), so both directions of
//!   a connection meet on one worker.
//! - IPv6: port security, an ND responder (bindings and gateway addresses)
//!   and forwarding between attached subnets (hop-limit decrement); no IPv6
//!   static routes, no ICMPv6 errors (expiring hop limits are dropped and
//!   counted).
pub mod afpacket;
pub mod bench;
pub mod config;
#[cfg(test)]
mod config_tests;
pub mod conntrack;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod dhcp;
pub mod engine;
pub mod fastmap;
pub mod flowcache;
#[cfg(test)]
mod flowcache_tests;
pub mod handoff;
pub mod lb4;
pub mod lb4_health;
#[cfg(test)]
mod lb4_tests;
pub mod lpm;
pub mod maglev;
pub mod mirror;
pub mod model;
pub mod nat;
pub mod nat64;
pub mod overlay;
#[cfg(test)]
mod overlay_tests;
pub mod packet;
pub mod pipeline;
#[cfg(test)]
mod pipeline_tests;
pub mod policy;
pub mod port;
pub mod qos;
#[cfg(test)]
mod qos_tests;
pub mod security;
pub mod stateful;
#[cfg(test)]
mod stateful_tests;
pub mod steer;
pub mod tables;
pub mod testutil;
