//! vhost-user-net: VM NICs as data-plane ports.
//!
//! # Design
//! - [`device::NetDevice`] is the rust-vmm `VhostUserBackend` (features,
//!   config space, one RX and one TX queue). It moves no packets: on a queue
//!   kick it publishes the connection's vrings and guest memory to the
//!   [`port::VhostNetPort`] (once per connection) and wakes the data-plane
//!   worker.
//! - [`port::VhostNetPort`] implements the data plane's
//!   [`keel_dataplane::port::Port`]: `rx_batch` pops the guest's TX chains
//!   straight into the worker's pre-allocated `PacketBuf`s, `tx_batch` copies
//!   frames into the guest's RX buffers (mergeable: a frame may span several
//!   chains, `num_buffers` tells the guest). So the switch and router
//!   forward between VM NICs exactly as between AF_PACKET interfaces.
//! - [`server`] serves one socket across frontend reconnects: each connection
//!   gets a fresh device, the port (and the worker holding it) stays. The
//!   frontend talks to the device through a small message relay (`relay`)
//!   that works around QEMU 7.2 sending `SET_VRING_ENABLE` before
//!   `SET_FEATURES`, which rust-vmm's vhost crate rejects.
//!
//! # Threading model
//! The data-plane worker itself polls the virtqueues. vhost-user-backend's
//! epoll thread only handles the vhost-user protocol and kicks; a kick sets
//! an atomic flag and writes an eventfd (the port's `poll_fd`) so an idle
//! worker wakes up. Why not SPSC rings between the backend thread and the
//! worker: that would copy every frame twice (guest → ring → worker buffer)
//! and add a thread hand-off per batch; polling the vring from the worker
//! copies once and keeps run-to-completion. The price is the vring's
//! `RwLock`, taken once per batch per queue (never per packet) and contended
//! only while the frontend reconfigures the queue.
//!
//! # Assumptions
//! - One queue pair (no VIRTIO_NET_F_MQ), no segmentation offload: the
//!   guest sends frames of at most MTU 1500 (what fits a `PacketBuf`); larger
//!   chains are dropped and counted. VIRTIO_NET_F_CSUM is offered: a
//!   checksum-partial frame is completed when it is read off the TX ring
//!   (data-plane ports carry no offload metadata, so every destination,
//!   offloading or not, gets a complete frame). GUEST_CSUM is not offered:
//!   the guest verifies what it receives.
//! - The guest negotiates VIRTIO_F_VERSION_1 (12-byte header); a legacy
//!   guest without it gets the 10-byte header.
//! - A frame that finds the guest's RX ring full waits in a pre-allocated
//!   backlog of 256 frames (flushed first on every worker round and after the
//!   guest refills); only beyond that is it dropped (counted as `tx_failed`).
//! - Guest memory stays mapped while the worker holds a connection's state:
//!   the worker keeps its own clone of the `GuestMemoryAtomic` and vrings.

pub mod device;
pub mod port;
mod relay;
pub mod server;

pub use device::{NetDevice, NetShared};
pub use port::VhostNetPort;
pub use server::{listen, open_ports, NetServeError, NetServer, OpenPortsError};
