//! One worker thread's I/O engine: its own io_uring and a pre-allocated
//! request slot per queue entry. A queue kick starts a pipeline: available
//! chains go into free slots, their SQEs are submitted together with the
//! wait for the next completion (one `io_uring_enter` per round), finished
//! requests are completed and the guest is signalled once per round, and
//! freed slots are refilled at once, so the guest's queue depth stays in
//! flight.
//!
//! Latency: before sleeping the worker polls for a short, bounded time
//! (at most [`POLL_BUDGET`]): the completion queue while I/O is in flight
//! (only at low queue depth, in an adaptive window that closes when
//! completions take longer, see [`adapt_poll`]), the available ring once
//! the queue drained. A sleep and wake-up through the
//! scheduler (and, in a VM, a halted vCPU) costs about as much as a fast
//! device I/O, so at low queue depth polling saves a wake-up per request
//! on both sides; it is bounded so an idle disk costs no CPU.
//!
//! Synchronous replication: when the hook has a [`CompletionGate`], a
//! finished write waits in `held` (slot still taken) until the gate
//! releases its ticket; the worker sleeps on its own eventfd, polled
//! through the same io_uring as its I/O, and a kick still returns only
//! once nothing it took is held (so a ring stop covers held writes too).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::DiskShared;
use crate::disk::RawDisk;
use crate::hook::{CompletionGate, WriteData, WriteHook};
use crate::qcow2::{Qcow2, Qcow2Error};
use crate::request::{DiskView, ParseError, Request, RequestKind, STATUS_IOERR, STATUS_OK};

/// Guest memory as the vhost-user-backend crate hands it to us.
pub(crate) type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// SQEs one request may need: a discard of `MAX_DISCARD_SEGS` ranges, or a
/// write plus its write-through fsync.
const MAX_SQES_PER_REQUEST: usize = crate::config::MAX_DISCARD_SEGS as usize;

/// How long the worker polls (completions, or the available ring) before
/// it sleeps. About one fast device I/O: long enough to catch a QD1
/// completion or the guest's next request, short enough that an idle
/// queue stops burning CPU at once.
const POLL_BUDGET: Duration = Duration::from_micros(50);

/// Most requests in flight for which the worker polls for completions.
const POLL_MAX_REQUESTS: usize = 2;

/// Smallest completion-poll window; below it the worker does not poll.
const POLL_MIN: Duration = Duration::from_micros(4);

/// Polling iterations between two clock reads and yields (the clock is a
/// vDSO call, the yield a syscall: cheap, but not free).
const POLL_CLOCK_EVERY: u32 = 64;

/// The image is registered with the ring as fixed file 0, so the kernel
/// takes no file reference per I/O.
const DISK_FILE: types::Fixed = types::Fixed(0);

/// user_data layout: slot index << 1 | 1 for the data op, 0 for an fsync.
const UD_DATA: u64 = 1;

/// user_data of the poll on the worker's gate eventfd.
const UD_GATE: u64 = u64::MAX;

/// How long a worker with only held completions sleeps before it looks at
/// the available ring again: the guest does not kick while the worker
/// serves the queue (notifications are off), and its reads must not wait
/// a whole replication round trip behind held writes.
const GATE_TICK: Duration = Duration::from_micros(250);

/// Errors of the worker (the queue is left as is; the guest sees no
/// completion for the batch in flight only if the ring itself broke).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// io_uring setup failed.
    #[error("Cannot create io_uring")]
    CreateRing(#[source] std::io::Error),
    /// Registering the image with the ring failed.
    #[error("Cannot register the image with io_uring")]
    RegisterFile(#[source] std::io::Error),
    /// Waiting for completions failed.
    #[error("io_uring submit failed")]
    Submit(#[source] std::io::Error),
    /// The guest's available ring is invalid.
    #[error("Invalid available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// Putting a completion on the used ring failed.
    #[error("Cannot add used descriptor")]
    AddUsed(#[source] virtio_queue::Error),
    /// Notifying the guest failed.
    #[error("Cannot signal used queue")]
    Signal(#[source] std::io::Error),
    /// The eventfd a held completion waits on could not be created.
    #[error("Cannot create the completion gate eventfd")]
    GateEvent(#[source] std::io::Error),
}

/// Per-request outcome state that lives next to the slot.
#[derive(Default, Clone, Copy)]
struct SlotState {
    parse: Option<ParseError>,
    pending: u32,
    io_failed: bool,
}

/// The per-thread engine.
pub(crate) struct Worker {
    ring: IoUring,
    slots: Vec<Request>,
    states: Vec<SlotState>,
    /// Indices of slots not in flight (pre-allocated stack).
    free: Vec<usize>,
    /// Slots whose request finished and still need a used-ring entry.
    done: Vec<usize>,
    /// Finished writes waiting for the hook's gate: (ticket, slot).
    held: Vec<(u64, usize)>,
    /// Wakes this worker when the gate moves (made on first use).
    gate_fd: Option<Arc<EventFd>>,
    /// A poll on `gate_fd` is in the ring.
    gate_armed: bool,
    /// Current completion-poll window, adapted to how long completions
    /// take (see [`adapt_poll`]).
    cq_poll: Duration,
    /// Staging for qcow2 requests served synchronously (grown, never
    /// shrunk: no allocation once it fits the largest request).
    bounce: Vec<u8>,
    pub(crate) mem: Option<GuestMem>,
}

impl Worker {
    /// A worker for queues of `queue_size` entries on the image `disk_fd`.
    pub(crate) fn new(queue_size: u16, disk_fd: RawFd) -> Result<Self, WorkerError> {
        let entries = u32::from(queue_size).next_power_of_two().max(64);
        let ring = IoUring::new(entries).map_err(WorkerError::CreateRing)?;
        ring.submitter()
            .register_files(&[disk_fd])
            .map_err(WorkerError::RegisterFile)?;
        let n = usize::from(queue_size);
        let slots = (0..queue_size).map(|_| Request::default()).collect();
        Ok(Self {
            ring,
            slots,
            states: vec![SlotState::default(); n],
            free: (0..n).rev().collect(),
            done: Vec::with_capacity(n),
            held: Vec::with_capacity(n),
            gate_fd: None,
            gate_armed: false,
            cq_poll: POLL_BUDGET,
            bounce: Vec::new(),
            mem: None,
        })
    }

    /// Serves a kicked queue until it is empty and nothing is in flight.
    ///
    /// hot path: no allocation. Requests are kept in flight as a pipeline:
    /// every round submits all newly available requests together with the
    /// wait for at least one completion (one io_uring_enter), completes what
    /// finished, signals the guest once for them, and refills freed slots
    /// from the available ring, so the queue depth the guest offers stays on
    /// the device instead of draining to zero after each batch.
    pub(crate) fn process_queue<H: WriteHook>(
        &mut self,
        vring: &VringRwLock<GuestMem>,
        disk: &DiskShared,
        hook: &H,
        event_idx: bool,
    ) -> Result<(), WorkerError> {
        let Some(atomic) = self.mem.clone() else {
            return Ok(());
        };
        let mem = vm_memory::GuestAddressSpace::memory(&atomic);
        let view = DiskView {
            sectors: disk.disk.sectors(),
            readonly: disk.disk.readonly(),
            failed: disk.disk.failed(),
            serial: &disk.serial,
        };
        let mut in_flight = 0usize;
        if event_idx {
            vring
                .disable_notification()
                .map_err(WorkerError::AvailRing)?;
        }
        loop {
            in_flight += self.refill(vring, &mem, disk, &view)?;
            if !self.done.is_empty() {
                // Parse errors and GET_ID complete without I/O.
                self.complete(vring, &mem, hook, event_idx)?;
                continue;
            }
            if in_flight == 0 {
                if let (false, Some(gate)) = (self.held.is_empty(), hook.gate()) {
                    self.wait_gate(gate)?;
                    self.complete(vring, &mem, hook, event_idx)?;
                    continue;
                }
                if stopped(vring) {
                    // GET_VRING_BASE stopped the ring (the VM paused or the
                    // frontend is going away): everything taken is done.
                    return Ok(());
                }
                if poll_avail(vring, &mem)? {
                    continue;
                }
                if !event_idx
                    || !vring
                        .enable_notification()
                        .map_err(WorkerError::AvailRing)?
                {
                    return Ok(());
                }
                vring
                    .disable_notification()
                    .map_err(WorkerError::AvailRing)?;
                continue;
            }
            match self.submit_and_poll(vring, &mem) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(WorkerError::Submit(e)),
            }
            in_flight -= self.reap(disk);
            self.complete(vring, &mem, hook, event_idx)?;
        }
    }

    /// Submits the queued SQEs and returns once at least one completion is
    /// there: completions already posted need no syscall at all, new
    /// SQEs are submitted without waiting and the completion queue is
    /// polled (with the available ring) for up to the adaptive window
    /// `cq_poll`; only then the worker sleeps.
    fn submit_and_poll(
        &mut self,
        vring: &VringRwLock<GuestMem>,
        mem: &GuestMemoryMmap<()>,
    ) -> std::io::Result<()> {
        let queued = !self.ring.submission().is_empty();
        if !self.ring.completion().is_empty() {
            if queued {
                self.ring.submit()?;
            }
            return Ok(());
        }
        let start = Instant::now();
        // Only a latency-bound queue polls: with more requests in flight
        // the device pipeline is busy anyway, and a spinning worker takes
        // the CPU from the guest and from the kernel threads finishing
        // large writes (measured: 128 KiB writes at QD8 lost ~15%).
        let requests = self.slots.len() - self.free.len();
        if requests <= POLL_MAX_REQUESTS && !self.cq_poll.is_zero() {
            if queued {
                self.ring.submit()?;
            }
            // New requests end the poll too (when a slot is free to take
            // them): they go on the device now rather than after the next
            // completion.
            let can_take = !self.free.is_empty() && !stopped(vring);
            if poll_until(self.cq_poll, || {
                !self.ring.completion().is_empty() || (can_take && avail_pending(vring, mem))
            }) {
                return Ok(());
            }
        }
        self.ring.submit_and_wait(1)?;
        self.cq_poll = adapt_poll(self.cq_poll, start.elapsed());
        Ok(())
    }

    /// Moves available chains into free slots and queues their SQEs (not
    /// submitted yet); returns the number of SQEs queued.
    fn refill(
        &mut self,
        vring: &VringRwLock<GuestMem>,
        mem: &GuestMemoryMmap<()>,
        disk: &DiskShared,
        view: &DiskView<'_>,
    ) -> Result<usize, WorkerError> {
        let writethrough = !disk.wce.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() {
            // A stopped ring takes nothing more; the requests already in
            // flight still complete (see `BlockDevice::stop_vring`).
            return Ok(0);
        }
        let mut iter = queue.iter(mem).map_err(WorkerError::AvailRing)?;
        let mut sqes = 0usize;
        loop {
            let sq_free = {
                let sq = self.ring.submission();
                sq.capacity() - sq.len()
            };
            if sq_free < MAX_SQES_PER_REQUEST {
                break;
            }
            let Some(&n) = self.free.last() else { break };
            let Some(chain) = iter.next() else { break };
            self.free.pop();
            let head = chain.head_index();
            let (slot, st) = (&mut self.slots[n], &mut self.states[n]);
            *st = SlotState::default();
            match slot.parse(head, chain, mem, view) {
                Ok(()) => {
                    let offset = match disk.disk.qcow2() {
                        None => Some(slot.offset),
                        Some(q) => {
                            qcow2_route(q, &disk.disk, slot, st, &mut self.bounce, writethrough)
                        }
                    };
                    let pushed = match offset {
                        Some(offset) => push_sqes(&mut self.ring, slot, n, writethrough, offset),
                        None => 0,
                    };
                    st.pending = pushed;
                    sqes += pushed as usize;
                    if pushed == 0 {
                        self.done.push(n);
                    }
                }
                Err(e) => {
                    st.parse = Some(e);
                    self.done.push(n);
                }
            }
        }
        Ok(sqes)
    }

    /// Sleeps until `gate` may have released a held completion (or an
    /// I/O completion arrived): a poll on this worker's eventfd goes into
    /// the ring with whatever is in flight.
    fn wait_gate(&mut self, gate: &CompletionGate) -> Result<(), WorkerError> {
        let fd = match &self.gate_fd {
            Some(fd) => fd.clone(),
            None => {
                let fd =
                    Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::GateEvent)?);
                gate.subscribe(&fd);
                self.gate_fd = Some(fd.clone());
                fd
            }
        };
        if !self.gate_armed {
            let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                .build()
                .user_data(UD_GATE);
            // SAFETY: a poll carries no buffer; the eventfd outlives the
            // ring's use of it (the worker owns both; a poll still armed
            // when the ring is dropped is cancelled with it).
            if unsafe { self.ring.submission().push(&poll) }.is_err() {
                self.ring.submit().map_err(WorkerError::Submit)?;
                return Ok(());
            }
            self.gate_armed = true;
        }
        // A release after this check has written the eventfd: the poll
        // fires at once, no wake-up is lost.
        if self.held.iter().all(|&(t, _)| gate.holds(t)) {
            let tick = types::Timespec::from(GATE_TICK);
            let args = types::SubmitArgs::new().timespec(&tick);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => {}
                Err(e) => return Err(WorkerError::Submit(e)),
            }
        }
        Ok(())
    }

    /// Takes every available CQE; requests whose last SQE finished go to
    /// `done`. Returns the number of I/O CQEs taken.
    fn reap(&mut self, disk: &DiskShared) -> usize {
        let mut taken = 0usize;
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == UD_GATE {
                self.gate_armed = false;
                if let Some(fd) = &self.gate_fd {
                    // Resets the counter (EAGAIN when a racing read of an
                    // earlier wake-up already did).
                    let _ = fd.read();
                }
                continue;
            }
            taken += 1;
            let Ok(idx) = usize::try_from(ud >> 1) else {
                continue;
            };
            let (Some(slot), Some(st)) = (self.slots.get(idx), self.states.get_mut(idx)) else {
                continue;
            };
            st.pending = st.pending.saturating_sub(1);
            let res = cqe.result();
            let ok = if ud & UD_DATA != 0 {
                match slot.kind {
                    RequestKind::Read | RequestKind::Write => {
                        u64::try_from(res).is_ok_and(|r| r == slot.len)
                    }
                    _ => res >= 0,
                }
            } else {
                // An fsync: a failure (other than cancellation after a
                // failed linked write) means written-back data may be
                // lost, so the disk is failed for good.
                if res < 0 && res != -libc::ECANCELED {
                    disk.disk.mark_failed();
                }
                res >= 0
            };
            if !ok {
                st.io_failed = true;
            }
            if st.pending == 0 {
                self.done.push(idx);
            }
        }
        taken
    }

    /// Completes the finished requests to the guest (hook first; those the
    /// hook's gate holds wait in `held`) and the held ones the gate
    /// released, frees their slots and signals the guest once for all.
    fn complete<H: WriteHook>(
        &mut self,
        vring: &VringRwLock<GuestMem>,
        mem: &GuestMemoryMmap<()>,
        hook: &H,
        event_idx: bool,
    ) -> Result<(), WorkerError> {
        let gate = hook.gate();
        let releasable = gate.is_some_and(|g| self.held.iter().any(|&(t, _)| !g.holds(t)));
        if self.done.is_empty() && !releasable {
            return Ok(());
        }
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let mut completed = 0usize;
        for &i in &self.done {
            let (slot, st) = (&self.slots[i], self.states[i]);
            let status = match st.parse {
                Some(e) => e.status(),
                None if st.io_failed => Some(STATUS_IOERR),
                None => {
                    run_hook(hook, slot);
                    if let Some(g) = gate.filter(|_| slot.kind.modifies()) {
                        let ticket = g.issued();
                        if g.holds(ticket) {
                            self.held.push((ticket, i));
                            continue;
                        }
                    }
                    Some(STATUS_OK)
                }
            };
            finish(queue, mem, slot, status)?;
            self.free.push(i);
            completed += 1;
        }
        self.done.clear();
        if let Some(g) = gate {
            let mut k = 0;
            while k < self.held.len() {
                let (ticket, i) = self.held[k];
                if g.holds(ticket) {
                    k += 1;
                    continue;
                }
                self.held.swap_remove(k);
                finish(queue, mem, &self.slots[i], Some(STATUS_OK))?;
                self.free.push(i);
                completed += 1;
            }
        }
        if completed == 0 {
            return Ok(());
        }
        let notify = if event_idx {
            queue
                .needs_notification(mem)
                .map_err(WorkerError::AddUsed)?
        } else {
            true
        };
        if notify {
            state.signal_used_queue().map_err(WorkerError::Signal)?;
        }
        Ok(())
    }
}

/// Writes the status byte and puts the request on the used ring.
fn finish(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap<()>,
    slot: &Request,
    status: Option<u8>,
) -> Result<(), WorkerError> {
    let used = match (status, slot.status_addr) {
        (Some(s), Some(addr)) if mem.write_slice(&[s], addr).is_ok() => slot.used_len(s),
        _ => 0,
    };
    queue
        .add_used(mem, slot.head, used)
        .map_err(WorkerError::AddUsed)
}

/// Routes a request on a qcow2 image: `Some(host offset)` when it goes to
/// io_uring (data in one run of allocated clusters, after allocating new
/// ones for a write; a flush after writing the metadata back), `None` when
/// it was served here synchronously (holes, backing data, discards; the
/// outcome is in `st`).
fn qcow2_route(
    q: &Qcow2,
    disk: &RawDisk,
    req: &Request,
    st: &mut SlotState,
    bounce: &mut Vec<u8>,
    writethrough: bool,
) -> Option<u64> {
    // Bounded by the parser (seg_max × page size).
    let len = usize::try_from(req.len).unwrap_or_default();
    let served: Result<(), Qcow2Error> = match req.kind {
        RequestKind::GetId => return Some(0),
        // Nothing moves: no cluster to map (a raw disk completes these too).
        RequestKind::Read | RequestKind::Write if req.len == 0 => return Some(0),
        RequestKind::Read => {
            if let Some(host) = q.map(req.offset, req.len, false) {
                return Some(host);
            }
            bounce.resize(len, 0);
            q.read_at(req.offset, bounce)
                .map(|()| scatter(&req.iovecs.0, bounce))
        }
        RequestKind::Write => {
            if let Some(host) = q.map(req.offset, req.len, true) {
                return Some(host);
            }
            let prepared = q.prepare_write(req.offset, req.len).and_then(|()| {
                // Write-through: the new clusters' metadata is durable
                // before the write (whose fsync then covers the tables).
                if writethrough {
                    q.flush()?;
                }
                Ok(())
            });
            match prepared.map(|()| q.map(req.offset, req.len, true)) {
                Ok(Some(host)) => return Some(host),
                Ok(None) => {
                    // New clusters not contiguous with the old ones.
                    bounce.resize(len, 0);
                    WriteData::new(&req.iovecs.0).copy_to(bounce);
                    q.write_at(req.offset, bounce).and_then(|()| {
                        if writethrough {
                            q.sync()?;
                        }
                        Ok(())
                    })
                }
                Err(e) => Err(e),
            }
        }
        RequestKind::Flush => match q.flush() {
            Ok(()) => return Some(0),
            Err(e) => {
                disk.mark_failed();
                Err(e)
            }
        },
        RequestKind::Discard | RequestKind::WriteZeroes => {
            let zero = req.kind == RequestKind::WriteZeroes;
            req.segments[..req.nsegs]
                .iter()
                .try_for_each(|s| q.discard(s.offset, s.len, zero, !zero || s.unmap))
        }
    };
    if let Err(e) = served {
        tracing::warn!(error = %e, offset = req.offset, "qcow2 request failed");
        st.io_failed = true;
    }
    None
}

/// Copies `data` into the guest buffers of a read.
fn scatter(iovecs: &[libc::iovec], data: &[u8]) {
    let mut done = 0;
    for v in iovecs {
        let n = v.iov_len.min(data.len() - done);
        // SAFETY: every iovec was built from a vm-memory `VolatileSlice` of
        // mapped guest memory that stays mapped while the request is in
        // flight (see `WriteData::copy_to`); `n` is within both buffers.
        unsafe {
            std::ptr::copy_nonoverlapping(data[done..].as_ptr(), v.iov_base.cast::<u8>(), n);
        }
        done += n;
        if done == data.len() {
            break;
        }
    }
}

/// Queues the SQEs of one parsed request (its data at image byte
/// `offset`); returns how many.
fn push_sqes(
    ring: &mut IoUring,
    req: &Request,
    idx: usize,
    writethrough: bool,
    offset: u64,
) -> u32 {
    let fd = DISK_FILE;
    let ud = (idx as u64) << 1;
    let mut entries: [Option<squeue::Entry>; MAX_SQES_PER_REQUEST] =
        [const { None }; MAX_SQES_PER_REQUEST];
    let mut k = 0usize;
    let iov_ptr = req.iovecs.0.as_ptr();
    // ≤ MAX_IOVECS, checked by the parser.
    let iov_cnt = u32::try_from(req.iovecs.0.len()).unwrap_or(0);
    let fsync = || {
        opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(ud)
    };
    match req.kind {
        RequestKind::GetId => {}
        RequestKind::Flush => {
            entries[0] = Some(fsync());
            k = 1;
        }
        RequestKind::Read => {
            entries[0] = Some(
                opcode::Readv::new(fd, iov_ptr, iov_cnt)
                    .offset(offset)
                    .build()
                    .user_data(ud | UD_DATA),
            );
            k = 1;
        }
        RequestKind::Write => {
            let w = opcode::Writev::new(fd, iov_ptr, iov_cnt)
                .offset(offset)
                .build()
                .user_data(ud | UD_DATA);
            if writethrough {
                entries[0] = Some(w.flags(squeue::Flags::IO_LINK));
                entries[1] = Some(fsync());
                k = 2;
            } else {
                entries[0] = Some(w);
                k = 1;
            }
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            for seg in &req.segments[..req.nsegs] {
                let mode = if req.kind == RequestKind::Discard || seg.unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                entries[k] = Some(
                    opcode::Fallocate::new(fd, seg.len)
                        .offset(seg.offset)
                        .mode(mode)
                        .build()
                        .user_data(ud | UD_DATA),
                );
                k += 1;
            }
        }
    }
    let mut sq = ring.submission();
    let mut pushed = 0;
    for e in entries.iter().take(k).flatten() {
        // SAFETY: the iovec array and the guest buffers it points to stay
        // valid until the completion is reaped: the slot is not reused and
        // the guest memory guard is held until the whole batch completed.
        // Space was checked by the caller (MAX_SQES_PER_REQUEST free).
        if unsafe { sq.push(e) }.is_ok() {
            pushed += 1;
        }
    }
    pushed
}

/// The next completion-poll window after a wait of `waited` that ended
/// in a sleep (as QEMU adapts its event-loop polling): a completion that
/// came after the window but within [`POLL_BUDGET`] widens it, one that
/// took longer than the budget halves it, down to no polling. Slow
/// completions (large writes at depth, a slow device) so stop the spin:
/// it would burn CPU for nothing and, for writes, delay the kernel worker
/// thread that completes them on this CPU.
fn adapt_poll(window: Duration, waited: Duration) -> Duration {
    if waited > POLL_BUDGET {
        let half = window / 2;
        if half < POLL_MIN {
            Duration::ZERO
        } else {
            half
        }
    } else if waited > window {
        (window * 2).clamp(POLL_MIN, POLL_BUDGET)
    } else {
        window
    }
}

/// Calls `ready` until it returns true or `budget` passed; returns its
/// last answer.
fn poll_until(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(POLL_CLOCK_EVERY) {
            if start.elapsed() >= budget {
                return false;
            }
            // Let a runnable thread on this CPU go first (often the very
            // frontend whose next request or completion handling we wait
            // for); returns at once when there is none.
            // SAFETY: plain syscall without arguments.
            unsafe { libc::sched_yield() };
        }
    }
}

/// Polls the available ring for a new request for up to [`POLL_BUDGET`]
/// (the guest usually sends the next one right after a completion; this
/// catches it without a kick and an epoll wake-up). The vring lock is
/// taken for reading per look, like the guest-side notification checks.
/// True when the guest made a request available that is not taken yet,
/// or when the available ring cannot be read (the caller's next refill
/// reports that error).
/// True once GET_VRING_BASE stopped the ring.
fn stopped(vring: &VringRwLock<GuestMem>) -> bool {
    !vring.get_ref().get_queue().ready()
}

fn avail_pending(vring: &VringRwLock<GuestMem>, mem: &GuestMemoryMmap<()>) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(mem, Ordering::Acquire)
        .map_or(true, |idx| idx.0 != queue.next_avail())
}

fn poll_avail(
    vring: &VringRwLock<GuestMem>,
    mem: &GuestMemoryMmap<()>,
) -> Result<bool, WorkerError> {
    let mut broken = None;
    let found = poll_until(POLL_BUDGET, || {
        let state = vring.get_ref();
        let queue = state.get_queue();
        match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != queue.next_avail(),
            Err(e) => {
                broken = Some(e);
                true
            }
        }
    });
    match broken {
        Some(e) => Err(WorkerError::AvailRing(e)),
        None => Ok(found),
    }
}

/// Passes a successfully completed request to the write hook.
fn run_hook<H: WriteHook>(hook: &H, req: &Request) {
    match req.kind {
        RequestKind::Write => hook.on_write(req.offset, req.len, &WriteData::new(&req.iovecs.0)),
        RequestKind::Discard => {
            for s in &req.segments[..req.nsegs] {
                hook.on_discard(s.offset, s.len);
            }
        }
        RequestKind::WriteZeroes => {
            for s in &req.segments[..req.nsegs] {
                hook.on_write_zeroes(s.offset, s.len);
            }
        }
        RequestKind::Flush => hook.on_flush(),
        RequestKind::Read | RequestKind::GetId => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn poll_window_grows_for_fast_completions_and_closes_for_slow_ones() {
        // A completion just after the window widens it, up to the budget.
        assert_eq!(adapt_poll(us(8), us(12)), us(16));
        assert_eq!(adapt_poll(Duration::ZERO, us(3)), POLL_MIN);
        assert_eq!(adapt_poll(POLL_BUDGET, us(49)), POLL_BUDGET);
        // Within the window: unchanged.
        assert_eq!(adapt_poll(us(16), us(10)), us(16));
        // Slower than the budget: halved, then off.
        let mut w = POLL_BUDGET;
        for _ in 0..8 {
            w = adapt_poll(w, us(400));
        }
        assert_eq!(w, Duration::ZERO);
        assert_eq!(adapt_poll(Duration::ZERO, us(400)), Duration::ZERO);
    }
}
