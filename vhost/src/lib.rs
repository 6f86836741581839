//! keel's vhost-user backends: the virtio-blk disks QEMU guests use, and
//! virtio-net NICs plugged into the data plane as ports ([`net`]).
//!
//! # Design
//! - [`request`] parses one virtio-blk descriptor chain into a validated
//!   request (the guest is hostile: every address, length and sector is
//!   checked; a bad request gets `VIRTIO_BLK_S_IOERR`/`UNSUPP`, never a
//!   panic).
//! - [`worker`] is the I/O engine: one io_uring per worker thread, one
//!   pre-allocated request slot per queue entry, one submit per queue kick.
//! - [`device`] implements rust-vmm's `VhostUserBackend` (features, config
//!   space, queue-to-thread mapping); [`server`] runs it on a socket across
//!   frontend reconnects.
//! - [`hook`] is the single write-path seam: every completed write,
//!   discard, write-zeroes and flush passes a [`WriteHook`]; [`cbt`] is the
//!   changed-block-tracking implementation on it; [`control`] is the
//!   disk server's control socket the agent manages the live bitmaps with
//!   (online backups).
//! - [`qcow2`] maps qcow2 images: requests in one run of allocated
//!   clusters go to io_uring translated; the rest (holes, backing data,
//!   allocation, discard) take a synchronous slow path.
//! - [`disk`] creates and opens raw images (thin or thick). An O_DIRECT
//!   image's page cache is dropped at open: io_uring cannot submit a direct
//!   write inline while pages of its range are cached and hands it to its
//!   worker threads, which serialize the writes of one file.
//!
//! # Threading model
//! vhost-user-backend runs one thread for the vhost-user socket and one
//! epoll thread per entry of `queues_per_thread` (queue `i` on worker
//! `i % threads`). Each worker owns its io_uring and slots (a `Mutex` taken
//! once per kick, uncontended). A kick is served to completion on that
//! thread: parse the whole available ring, submit, wait, complete, notify.
//! Before sleeping, a worker polls for a bounded time (50 us at most): the
//! completion queue while at most two requests are in flight (adaptive
//! window, closed when completions take longer), the available ring once
//! the queue drained. This saves a sleep/wake-up per request at QD1 and
//! costs no CPU on an idle disk.
//!
//! # Assumptions
//! - Guest memory is shared (memfd) and stays mapped while a batch runs
//!   (the worker holds the memory guard for the batch).
//! - Write-back semantics: a completed write may sit in the host page cache
//!   until the guest's FLUSH (fdatasync). After a failed fdatasync the disk
//!   is marked failed and every later request fails.
//! - A stopped ring (GET_VRING_BASE, sent by QEMU when the VM pauses)
//!   takes no new request, and the stop returns once the requests already
//!   taken completed: after a pause every write the guest submitted has
//!   passed the write hook.
//! - Requests in flight when the backend dies are not in the used ring;
//!   QEMU resubmits them from the last used index on reconnect.

pub mod cbt;
pub mod config;
pub mod control;
pub mod device;
pub mod disk;
pub mod frontend;
pub mod hook;
pub mod net;
pub mod qcow2;
pub mod request;
pub mod server;
pub mod worker;

pub use cbt::{Cbt, CbtError};
pub use device::{BlockDevice, DiskShared, QueueConfig};
pub use disk::{create_raw_volume, DiskError, DiskOptions, ImageFormat, Provisioning, RawDisk};
pub use hook::{CompletionGate, NoHook, WriteData, WriteHook};
pub use server::{
    cbt_path, serve, serve_disk, DiskServeOptions, ServeConfig, ServeDiskError, ServeError,
    StopHandle,
};
