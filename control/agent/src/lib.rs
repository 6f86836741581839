//! keel's host agent: the part of the control plane that touches the host.
//!
//! # Design
//!
//! Data flows one way: the API writes resources and queues tasks in the
//! store; the agent takes tasks in order ([`keel_control::api::tasks::claim_next`]),
//! carries them out against libvirt (VMs), `qemu-img` (volume files) and
//! keel's own disk backends (one `keel vhost-blk` process per attached
//! volume, see [`disk_servers`]) and the data plane (one `keel dataplane`
//! serving every VM NIC, fed the store's networks, see [`network`]), then records the outcome on the task and
//! what it observes on the resource's `status`. Between tasks it watches
//! every VM's domain, so a VM that QEMU left (killed, crashed, powered off
//! from inside) is reported `STOPPED` with a reason, not `RUNNING`.
//!
//! # Threading model
//!
//! One thread, because libvirt's client calls block; it reaches the async
//! store through the runtime handle it was spawned from. Tasks of different
//! VMs therefore run one after another, which keeps ordering trivially
//! right; long steps (image copies) report progress on their task.
//!
//! # Assumptions
//!
//! Embedded mode: the agent runs inside `keel up` on the host it manages
//! and every VM of the store lives here (placement across hosts comes with
//! the hosts resource). When keel stops, VMs keep running; their disk
//! backends are stopped cleanly and QEMU's vhost-user reconnect picks up
//! the backends the next `keel up` starts.

pub mod accel;
pub mod children;
pub mod disk_servers;
pub mod domain_xml;
pub mod inventory;
pub mod libvirtd;
pub mod load_balancers;
pub mod network;
pub mod provision;
pub mod replica_servers;
mod run;

pub use domain_xml::Accel;
pub use run::{spawn, AgentConfig};
