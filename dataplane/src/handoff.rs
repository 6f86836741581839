//! Frame handoff between workers (VPP's worker handoff): a worker that
//! receives a frame another worker owns ([`crate::steer`]) passes the buffer
//! itself over a bounded lock-free ring, without copying or allocating.
//!
//! Each ordered pair of workers has one [`Lane`]: `full` carries buffers
//! (with their ingress interface) from the sender to the owner, `free`
//! carries the emptied buffers back. The sender swaps a free buffer into
//! its receive array in place of the one it hands over, so every worker's
//! buffer count stays constant; the lane starts with [`LANE_DEPTH`] free
//! buffers. When `free` is empty (the owner is [`LANE_DEPTH`] frames behind)
//! the frame is dropped and counted (`handoff_full`), the backpressure of a
//! full NIC queue.
//!
//! Learned MACs travel the same way (`learned`): a worker shares each MAC
//! it learns with the others once per round, so a frame towards a MAC
//! learned on another worker is not flooded (learning tables stay per
//! worker, lock-free; the copies converge within a round). So do the
//! routers' neighbors and their confirmations: whichever worker an ARP
//! reaches, every worker knows the neighbor and keeps it fresh.
//!
//! A sleeping owner (idle in `poll(2)`) is woken through its eventfd, only
//! when it announced it sleeps ([`Wake`]), so a busy owner costs no syscall.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::port::PacketBuf;

/// Buffers in flight per ordered worker pair.
pub const LANE_DEPTH: usize = 256;

/// Learned MACs in flight per ordered worker pair; when full, the receiver
/// learns the MAC itself (after flooding once), as a single worker would.
pub const LEARN_DEPTH: usize = 1024;

/// A frame in transit to its owner.
pub struct Handed {
    pub in_port: u16,
    pub buf: PacketBuf,
}

/// What one worker learned and shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// A MAC (switch+MAC key) behind a logical port.
    Mac {
        key: u64,
        lport: crate::tables::LportId,
    },
    /// A router's neighbor (switch+IPv4 key) at `mac`, confirmed by its ARP
    /// at `confirmed` (the sender's conntrack clock, s: workers start
    /// together, so their clocks agree to the second).
    Neighbor {
        key: u64,
        mac: crate::packet::headers::Mac,
        confirmed: u32,
    },
}

/// A [`Learn`] with the tables generation it was learned under.
pub type LearnedMac = (u64, Learn);

/// One direction between two workers.
pub struct Lane {
    pub full: ArrayQueue<Handed>,
    pub free: ArrayQueue<PacketBuf>,
    /// MACs the sender learned, so the receiver forwards to them without
    /// flooding first (learning is rare: new or moved MACs only).
    pub learned: ArrayQueue<LearnedMac>,
}

impl Lane {
    fn new() -> Lane {
        let free = ArrayQueue::new(LANE_DEPTH);
        for _ in 0..LANE_DEPTH {
            let _ = free.push(PacketBuf::default());
        }
        Lane {
            full: ArrayQueue::new(LANE_DEPTH),
            free,
            learned: ArrayQueue::new(LEARN_DEPTH),
        }
    }
}

/// How one worker is woken from its idle wait.
pub struct Wake {
    fd: Option<OwnedFd>,
    sleeping: AtomicBool,
}

impl Wake {
    fn new() -> Wake {
        // SAFETY: plain eventfd(2) call.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        Wake {
            // SAFETY: `raw` is a fresh descriptor we own (when non-negative).
            fd: (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) }),
            sleeping: AtomicBool::new(false),
        }
    }

    /// The descriptor the worker adds to its idle `poll(2)`.
    pub fn fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Announces (or withdraws) an idle wait; after announcing, the worker
    /// re-checks its lanes before sleeping, so a wake cannot be lost.
    pub fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
    }

    /// Wakes the worker if it sleeps (a syscall only then).
    pub fn wake(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            if let Some(fd) = &self.fd {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64 to our eventfd.
                unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }
        }
    }

    /// Clears a pending wake-up after the idle wait.
    pub fn drain(&self) {
        if let Some(fd) = &self.fd {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
            unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }
}

/// All lanes and wake-ups of a set of workers, shared by them.
pub struct Fabric {
    workers: usize,
    /// `lanes[from * workers + to]` (the diagonal is unused).
    lanes: Vec<Lane>,
    wakes: Vec<Wake>,
}

impl Fabric {
    /// Lanes between `workers` workers, all buffers allocated now.
    pub fn new(workers: usize) -> Arc<Fabric> {
        let workers = workers.max(1);
        let pairs = if workers > 1 { workers * workers } else { 0 };
        Arc::new(Fabric {
            workers,
            lanes: (0..pairs).map(|_| Lane::new()).collect(),
            wakes: (0..workers).map(|_| Wake::new()).collect(),
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The lane from `from` to `to`.
    pub fn lane(&self, from: usize, to: usize) -> Option<&Lane> {
        if from == to {
            return None;
        }
        self.lanes.get(from * self.workers + to)
    }

    /// Worker `w`'s wake-up.
    pub fn wake(&self, w: usize) -> Option<&Wake> {
        self.wakes.get(w)
    }

    /// Whether any lane towards `to` holds frames.
    pub fn pending(&self, to: usize) -> bool {
        (0..self.workers).any(|from| self.lane(from, to).is_some_and(|l| !l.full.is_empty()))
    }
}
