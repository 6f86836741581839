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
//! # Threading model
//!
//! One worker thread ([`engine::Worker`]) owns all ports of a data plane and
//! runs each batch of up to 32 frames to completion: no allocation, no lock and
//! no syscall per packet (one `sendmmsg` per output port per batch; a `poll(2)`
//! only when every port was idle). Counters are plain per-worker arrays folded
//! into shared atomics once per round. The control socket runs on other threads
//! and only touches the `ArcSwap` and the atomics.
//!
//! # Assumptions
//!
//! - Frames fit a 2048-byte buffer (MTU 1500 + tags); larger ones are counted
//!   as `oversize` drops. No GSO/TSO and no checksum offload: endpoints on veth
//!   must run `ethtool -K <if> tx off` (no `PACKET_VNET_HDR` support yet).
//! - At most 64 interfaces per data plane; one worker (multi-worker sharding of
//!   ports is not implemented).
//! - Next hops are resolved from bindings only (no ARP resolution by the router).
//! - IPv6: port security, an ND responder (bindings and gateway addresses)
//!   and forwarding between attached subnets (hop-limit decrement); no IPv6
//!   static routes, no ICMPv6 errors (expiring hop limits are dropped and
//!   counted).
pub mod afpacket;
pub mod bench;
pub mod config;
#[cfg(test)]
mod config_tests;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod dhcp;
pub mod engine;
pub mod fastmap;
pub mod lpm;
pub mod model;
pub mod packet;
pub mod pipeline;
#[cfg(test)]
mod pipeline_tests;
pub mod port;
pub mod tables;
pub mod testutil;
