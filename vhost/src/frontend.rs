//! A vhost-user-blk *frontend* (the driver side, what QEMU is to a backend),
//! for benchmarks and tests: it connects to any vhost-user-blk socket (keel's
//! or qemu-storage-daemon's), shares its own memfd-backed "guest" memory,
//! sets up split virtqueues and issues virtio-blk IN/OUT/FLUSH requests at a
//! fixed queue depth.
//!
//! # Design
//! - The vhost-user messages go through the `vhost` crate's [`Frontend`].
//! - The rings are hand-built in the shared memory (virtio-queue only has a
//!   device-side queue; its driver-side `MockSplitQueue` is test-only and
//!   allocates): per queue one descriptor table, avail ring and used ring,
//!   then per slot a 16-byte header, a 4 KiB-aligned data buffer (so an
//!   O_DIRECT backend needs no bounce) and a status byte. Slot `s` always
//!   uses descriptors `3s, 3s+1, 3s+2`, so submitting writes no allocation.
//! - Guest physical address 0 is the start of the mapping; the vring
//!   addresses are frontend virtual addresses as the protocol wants.
//! - The backend is untrusted: used-ring ids and lengths are checked, a
//!   bad one is an error, never a panic.
//!
//! # Threading model
//! [`Frontend::take_queues`] hands out one [`Queue`] per virtqueue; each can
//! be driven by its own thread. The vhost-user connection stays with the
//! [`Frontend`], which must outlive the I/O (dropping it disconnects).
//!
//! # Assumptions
//! - No EVENT_IDX, no indirect descriptors: completions are signalled on the
//!   call eventfd for every batch the backend completes.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Sector size of virtio-blk addressing.
pub const SECTOR: u64 = 512;
const PAGE: usize = 4096;
const DESC_SIZE: usize = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Connecting to the socket failed.
    #[error("Cannot connect to vhost-user socket")]
    Connect(#[source] vhost::Error),
    /// A vhost-user message failed (the step is named).
    #[error("vhost-user {0} failed")]
    Message(&'static str, #[source] vhost::Error),
    /// The backend lacks a feature we need.
    #[error("Backend lacks a required feature: {0}")]
    MissingFeature(&'static str),
    /// The backend offers fewer queues than asked for.
    #[error("Backend offers {offered} queues, {wanted} wanted")]
    TooFewQueues {
        /// Queues offered.
        offered: u64,
        /// Queues wanted.
        wanted: u16,
    },
    /// Parameters out of range.
    #[error("Invalid frontend configuration: {0}")]
    Config(&'static str),
    /// Creating the shared memory failed.
    #[error("Cannot create shared memory")]
    Memory(#[source] std::io::Error),
    /// Creating an eventfd failed.
    #[error("Cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    /// Kicking or waiting on an eventfd failed.
    #[error("eventfd I/O failed")]
    Notify(#[source] std::io::Error),
    /// The backend put something impossible in the used ring.
    #[error("Backend returned a bad used-ring entry (id {0})")]
    BadUsed(u32),
    /// No free slot (the caller exceeded the queue depth).
    #[error("No free request slot")]
    QueueFull,
    /// The request is larger than a slot's buffer.
    #[error("Request of {0} bytes exceeds the slot buffer")]
    TooLarge(u32),
}

/// What to set up.
#[derive(Debug, Clone, Copy)]
pub struct FrontendConfig {
    /// Virtqueues to set up (the backend must offer at least this many).
    pub queues: u16,
    /// Requests in flight per queue (slots).
    pub queue_depth: u16,
    /// Largest request data size in bytes (slot buffer size, rounded up to 4 KiB).
    pub max_request: u32,
}

/// Kind of a virtio-blk request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read (`VIRTIO_BLK_T_IN`).
    Read,
    /// Write (`VIRTIO_BLK_T_OUT`).
    Write,
    /// Flush (`VIRTIO_BLK_T_FLUSH`).
    Flush,
}

/// One completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The slot it used.
    pub slot: u16,
    /// The virtio-blk status byte the backend wrote (0 = OK).
    pub status: u8,
}

/// The memfd mapping shared with the backend.
struct Mapping {
    addr: *mut u8,
    len: usize,
    fd: File,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// raw pointers with the synchronisation described at the access sites.
unsafe impl Send for Mapping {}
// SAFETY: as above; each `Queue` only touches its own region.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Result<Self, FrontendError> {
        // SAFETY: the name is a valid NUL-terminated string.
        let raw = unsafe { libc::memfd_create(c"keel-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(FrontendError::Memory(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { File::from_raw_fd(raw) };
        fd.set_len(len as u64).map_err(FrontendError::Memory)?;
        // SAFETY: mapping a fd we own, length as truncated; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(FrontendError::Memory(std::io::Error::last_os_error()));
        }
        Ok(Self {
            addr: addr.cast(),
            len,
            fd,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no Queue outlives the Arc.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Offsets of one queue's pieces inside the mapping.
#[derive(Debug, Clone, Copy)]
struct QueueLayout {
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    headers: usize,
    status: usize,
    buffers: usize,
    buf_len: usize,
    end: usize,
}

fn align(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

impl QueueLayout {
    fn new(start: usize, depth: u16, buf_len: usize) -> Self {
        let size = (u32::from(depth) * 3).next_power_of_two().max(4);
        let size = u16::try_from(size).unwrap_or(u16::MAX);
        let n = usize::from(size);
        let desc = start;
        let avail = align(desc + DESC_SIZE * n, PAGE);
        let used = align(avail + 6 + 2 * n, PAGE);
        let headers = align(used + 6 + 8 * n, PAGE);
        let status = align(headers + 16 * usize::from(depth), PAGE);
        let buffers = align(status + usize::from(depth), PAGE);
        let end = buffers + buf_len * usize::from(depth);
        Self {
            size,
            desc,
            avail,
            used,
            headers,
            status,
            buffers,
            buf_len,
            end,
        }
    }
}

/// One virtqueue driven by this frontend (usable from its own thread).
pub struct Queue {
    map: Arc<Mapping>,
    layout: QueueLayout,
    depth: u16,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    in_flight: Vec<bool>,
    avail_idx: u16,
    published: u16,
    last_used: u16,
}

impl Queue {
    fn ptr(&self, off: usize) -> *mut u8 {
        // SAFETY: `off` is inside the mapping (layout checked at construction).
        unsafe { self.map.addr.add(off) }
    }

    /// Queue depth (slots).
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Slots not in flight.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// A slot's data buffer, for filling before a write or reading after a
    /// read completed. Only valid for slots not in flight.
    pub fn buffer_mut(&mut self, slot: u16) -> &mut [u8] {
        let s = usize::from(slot.min(self.depth.saturating_sub(1)));
        let p = self.ptr(self.layout.buffers + s * self.layout.buf_len);
        // SAFETY: the buffer lies inside the mapping; the backend writes it
        // only while the slot is in flight, and `&mut self` keeps this
        // borrow from overlapping a submit of the same slot.
        unsafe { std::slice::from_raw_parts_mut(p, self.layout.buf_len) }
    }

    /// Prepares a request on a free slot (not visible to the backend until
    /// [`Queue::kick`]). Returns the slot; fill its buffer for writes.
    pub fn push(&mut self, kind: RequestKind, sector: u64, len: u32) -> Result<u16, FrontendError> {
        if len as usize > self.layout.buf_len {
            return Err(FrontendError::TooLarge(len));
        }
        let slot = self.free.pop().ok_or(FrontendError::QueueFull)?;
        let s = usize::from(slot);
        self.in_flight[s] = true;
        let (ty, data_flags) = match kind {
            RequestKind::Read => (VIRTIO_BLK_T_IN, VRING_DESC_F_WRITE),
            RequestKind::Write => (VIRTIO_BLK_T_OUT, 0),
            RequestKind::Flush => (VIRTIO_BLK_T_FLUSH, 0),
        };
        let hdr_off = self.layout.headers + 16 * s;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: 16 bytes inside the mapping, owned by this free slot.
        unsafe { std::ptr::copy_nonoverlapping(hdr.as_ptr(), self.ptr(hdr_off), 16) };
        let status_off = self.layout.status + s;
        // SAFETY: one byte inside the mapping owned by this slot; 0xff marks "not written".
        unsafe { self.ptr(status_off).write_volatile(0xff) };
        let head = slot * 3;
        let data_off = self.layout.buffers + s * self.layout.buf_len;
        if kind == RequestKind::Flush {
            self.write_desc(head, hdr_off, 16, VRING_DESC_F_NEXT, head + 2);
        } else {
            self.write_desc(head, hdr_off, 16, VRING_DESC_F_NEXT, head + 1);
            self.write_desc(
                head + 1,
                data_off,
                len,
                data_flags | VRING_DESC_F_NEXT,
                head + 2,
            );
        }
        self.write_desc(head + 2, status_off, 1, VRING_DESC_F_WRITE, 0);
        let ring_pos = usize::from(self.avail_idx % self.layout.size);
        let entry = self.layout.avail + 4 + 2 * ring_pos;
        // SAFETY: inside the avail ring; only the frontend writes it.
        unsafe { self.ptr(entry).cast::<u16>().write_volatile(head.to_le()) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(slot)
    }

    fn write_desc(&self, idx: u16, off: usize, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; DESC_SIZE];
        d[0..8].copy_from_slice(&(off as u64).to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let p = self.ptr(self.layout.desc + DESC_SIZE * usize::from(idx));
        // SAFETY: descriptor `idx` < 3*depth <= ring size lies in the table.
        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), p, DESC_SIZE) };
    }

    /// Publishes the pushed requests and notifies the backend (one eventfd
    /// write per batch).
    pub fn kick(&mut self) -> Result<(), FrontendError> {
        if self.published == self.avail_idx {
            return Ok(());
        }
        let idx = self.ptr(self.layout.avail + 2).cast::<AtomicU16>();
        // SAFETY: the avail idx field is 2-aligned inside the mapping; the
        // release store orders the descriptors and ring entries before it.
        unsafe { (*idx).store(self.avail_idx.to_le(), Ordering::Release) };
        fence(Ordering::SeqCst);
        self.published = self.avail_idx;
        self.kick.write(1).map_err(FrontendError::Notify)
    }

    /// Collects completions into `out` (cleared first); blocks on the call
    /// eventfd until at least one is there.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> Result<(), FrontendError> {
        out.clear();
        loop {
            self.reap(out)?;
            if !out.is_empty() {
                return Ok(());
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(FrontendError::Notify(e));
                }
            }
            // Drain the counter (non-blocking); the used ring is the truth.
            let _ = self.call.read();
        }
    }

    /// Non-blocking: moves every new used-ring entry into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<(), FrontendError> {
        let idx = self.ptr(self.layout.used + 2).cast::<AtomicU16>();
        // SAFETY: the used idx field is 2-aligned inside the mapping; the
        // acquire load orders the entries and status bytes after it.
        let used_idx = u16::from_le(unsafe { (*idx).load(Ordering::Acquire) });
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.depth {
            return Err(FrontendError::BadUsed(u32::from(pending)));
        }
        while self.last_used != used_idx {
            let pos = usize::from(self.last_used % self.layout.size);
            let entry = self.ptr(self.layout.used + 4 + 8 * pos).cast::<u32>();
            // SAFETY: inside the used ring; written by the backend before idx.
            let id = u32::from_le(unsafe { entry.read_volatile() });
            let slot = u16::try_from(id / 3).map_err(|_| FrontendError::BadUsed(id))?;
            if id % 3 != 0 || slot >= self.depth || !self.in_flight[usize::from(slot)] {
                return Err(FrontendError::BadUsed(id));
            }
            // SAFETY: status byte of this slot inside the mapping.
            let status = unsafe {
                self.ptr(self.layout.status + usize::from(slot))
                    .read_volatile()
            };
            self.in_flight[usize::from(slot)] = false;
            self.free.push(slot);
            out.push(Completion { slot, status });
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(())
    }
}

/// A connected vhost-user-blk frontend.
pub struct Frontend {
    conn: VuFrontend,
    _map: Arc<Mapping>,
    queues: Vec<Queue>,
    capacity_sectors: u64,
    features: u64,
}

impl Frontend {
    /// Connects to `socket` and sets up `config.queues` virtqueues.
    pub fn connect(socket: &Path, config: FrontendConfig) -> Result<Self, FrontendError> {
        if config.queues == 0 || config.queue_depth == 0 || config.queue_depth > 256 {
            return Err(FrontendError::Config("queues >= 1, queue_depth 1..=256"));
        }
        let mut conn = VuFrontend::connect(socket, u64::from(config.queues))
            .map_err(FrontendError::Connect)?;
        let msg = FrontendError::Message;
        conn.set_owner().map_err(|e| msg("SET_OWNER", e))?;
        let offered = conn.get_features().map_err(|e| msg("GET_FEATURES", e))?;
        let needed =
            (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & needed != needed {
            return Err(FrontendError::MissingFeature(
                "VERSION_1 + PROTOCOL_FEATURES",
            ));
        }
        let wanted = needed | (1u64 << VIRTIO_BLK_F_FLUSH) | (1u64 << VIRTIO_BLK_F_MQ);
        let features = offered & wanted;
        conn.set_features(features)
            .map_err(|e| msg("SET_FEATURES", e))?;
        let proto = conn
            .get_protocol_features()
            .map_err(|e| msg("GET_PROTOCOL_FEATURES", e))?;
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(FrontendError::MissingFeature("CONFIG"));
        }
        let want_proto = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        conn.set_protocol_features(proto & want_proto)
            .map_err(|e| msg("SET_PROTOCOL_FEATURES", e))?;
        let offered_queues = if proto.contains(VhostUserProtocolFeatures::MQ) {
            conn.get_queue_num().map_err(|e| msg("GET_QUEUE_NUM", e))?
        } else {
            1
        };
        if offered_queues < u64::from(config.queues) {
            return Err(FrontendError::TooFewQueues {
                offered: offered_queues,
                wanted: config.queues,
            });
        }
        // virtio_blk_config: capacity is the first le64.
        let (_, cfg) = conn
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .map_err(|e| msg("GET_CONFIG", e))?;
        let cap_bytes: [u8; 8] = cfg
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or(FrontendError::MissingFeature("config space capacity"))?;
        let capacity_sectors = u64::from_le_bytes(cap_bytes);

        let buf_len = align(config.max_request.max(512) as usize, PAGE);
        let mut layouts = Vec::with_capacity(usize::from(config.queues));
        let mut end = 0;
        for _ in 0..config.queues {
            let l = QueueLayout::new(end, config.queue_depth, buf_len);
            end = align(l.end, PAGE);
            layouts.push(l);
        }
        let map = Arc::new(Mapping::new(end.max(PAGE))?);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: map.len as u64,
            userspace_addr: map.addr as u64,
            mmap_offset: 0,
            mmap_handle: map.fd.as_raw_fd(),
        };
        conn.set_mem_table(&[region])
            .map_err(|e| msg("SET_MEM_TABLE", e))?;

        let mut queues = Vec::with_capacity(layouts.len());
        for (i, layout) in layouts.into_iter().enumerate() {
            let kick = EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?;
            let va = |off: usize| map.addr as u64 + off as u64;
            conn.set_vring_num(i, layout.size)
                .map_err(|e| msg("SET_VRING_NUM", e))?;
            conn.set_vring_base(i, 0)
                .map_err(|e| msg("SET_VRING_BASE", e))?;
            conn.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: layout.size,
                    queue_size: layout.size,
                    flags: 0,
                    desc_table_addr: va(layout.desc),
                    used_ring_addr: va(layout.used),
                    avail_ring_addr: va(layout.avail),
                    log_addr: None,
                },
            )
            .map_err(|e| msg("SET_VRING_ADDR", e))?;
            conn.set_vring_call(i, &call)
                .map_err(|e| msg("SET_VRING_CALL", e))?;
            conn.set_vring_kick(i, &kick)
                .map_err(|e| msg("SET_VRING_KICK", e))?;
            conn.set_vring_enable(i, true)
                .map_err(|e| msg("SET_VRING_ENABLE", e))?;
            queues.push(Queue {
                map: map.clone(),
                layout,
                depth: config.queue_depth,
                kick,
                call,
                free: (0..config.queue_depth).rev().collect(),
                in_flight: vec![false; usize::from(config.queue_depth)],
                avail_idx: 0,
                published: 0,
                last_used: 0,
            });
        }
        Ok(Self {
            conn,
            _map: map,
            queues,
            capacity_sectors,
            features,
        })
    }

    /// Disk capacity in 512-byte sectors (from the config space).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Hands out the queues (once; later calls return none).
    pub fn take_queues(&mut self) -> Vec<Queue> {
        std::mem::take(&mut self.queues)
    }

    /// The underlying vhost-user connection.
    pub fn connection(&mut self) -> &mut VuFrontend {
        &mut self.conn
    }
}
