//! The write-path hook: the one seam every completed guest write, discard,
//! write-zeroes and flush passes through (CBT and, later, the CDP journal).
//!
//! The device is generic over the hook, so [`NoHook`] compiles to nothing:
//! zero cost when unused.
//!
//! A hook may also hold completions back ([`CompletionGate`]): synchronous
//! replication acknowledges a write to the guest only once the DR site has
//! it, so the worker parks the finished request until the gate releases
//! it, and keeps serving the queue meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::eventfd::EventFd;

/// Guest data of one completed write, still in guest memory.
///
/// Guest memory may change under us at any time (the guest owns it), so the
/// data is offered as a copy-out method instead of a `&[u8]`.
pub struct WriteData<'a> {
    iovecs: &'a [libc::iovec],
}

impl<'a> WriteData<'a> {
    pub(crate) fn new(iovecs: &'a [libc::iovec]) -> Self {
        Self { iovecs }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.iovecs.iter().map(|v| v.iov_len).sum()
    }

    /// True when the write carried no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the data into `out` (up to `out.len()` bytes); returns the
    /// number of bytes copied.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let mut done = 0;
        for v in self.iovecs {
            if done == out.len() {
                break;
            }
            let n = v.iov_len.min(out.len() - done);
            // SAFETY: every iovec was built from a vm-memory `VolatileSlice`
            // of mapped guest memory that stays mapped while the request is
            // in flight (the worker holds the memory guard until the request
            // is completed to the guest, which happens after the hook runs).
            // `volatile_copy` semantics are not needed: a racing guest write
            // only changes which bytes we see, never memory safety of `out`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>().cast_const(),
                    out[done..].as_mut_ptr(),
                    n,
                );
            }
            done += n;
        }
        done
    }
}

/// Observer of the completed write path of one disk.
///
/// Called on the worker thread that completed the request, after the I/O
/// succeeded and before the guest sees the completion. Implementations must
/// be cheap and must not block (they run in the hot path).
pub trait WriteHook: Send + Sync + 'static {
    /// A guest write of `len` bytes at byte `offset` completed.
    fn on_write(&self, _offset: u64, _len: u64, _data: &WriteData<'_>) {}
    /// A discard of `len` bytes at `offset` completed (the range reads zero).
    fn on_discard(&self, _offset: u64, _len: u64) {}
    /// A write-zeroes of `len` bytes at `offset` completed.
    fn on_write_zeroes(&self, _offset: u64, _len: u64) {}
    /// A guest flush completed: everything completed before it is durable.
    fn on_flush(&self) {}
    /// The gate completions of this disk wait for (synchronous
    /// replication); `None` completes them at once.
    fn gate(&self) -> Option<&CompletionGate> {
        None
    }
}

/// Holds completed writes back until whoever owns the gate releases them.
///
/// Tickets count the writes the owner accepted (it calls
/// [`CompletionGate::issue`] inside the hook); the worker reads
/// [`CompletionGate::issued`] after the hook ran, which is at least the
/// request's own ticket, and completes the request once
/// [`CompletionGate::release`] reached it. An *open* gate holds nothing
/// (synchronous replication fell back to asynchronous).
///
/// Waiting workers sleep on their own eventfd (subscribed here), polled
/// through their io_uring with the I/O they have in flight.
#[derive(Debug)]
pub struct CompletionGate {
    issued: AtomicU64,
    released: AtomicU64,
    open: AtomicBool,
    waiters: Mutex<Vec<Weak<EventFd>>>,
}

impl Default for CompletionGate {
    fn default() -> Self {
        Self::new(false)
    }
}

impl CompletionGate {
    /// A gate, open (holding nothing) or closed.
    pub fn new(open: bool) -> Self {
        Self {
            issued: AtomicU64::new(0),
            released: AtomicU64::new(0),
            open: AtomicBool::new(open),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// Takes the next ticket (the owner calls it once per accepted write,
    /// in its own order).
    pub fn issue(&self) -> u64 {
        self.issued.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The last ticket taken.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Acquire)
    }

    /// The highest ticket released.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Acquire)
    }

    /// Releases every completion up to `ticket`.
    pub fn release(&self, ticket: u64) {
        if self.released.fetch_max(ticket, Ordering::AcqRel) < ticket {
            self.wake();
        }
    }

    /// Opens the gate (everything held goes, nothing new is held) or
    /// closes it again.
    pub fn set_open(&self, open: bool) {
        if !self.open.swap(open, Ordering::AcqRel) && open {
            self.wake();
        }
    }

    /// Whether the gate holds nothing.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Whether a completion with `ticket` must still wait.
    pub fn holds(&self, ticket: u64) -> bool {
        !self.is_open() && self.released() < ticket
    }

    /// Completions still held (issued, neither released nor open).
    pub fn pending(&self) -> u64 {
        if self.is_open() {
            0
        } else {
            self.issued().saturating_sub(self.released())
        }
    }

    /// Registers a worker's wake-up eventfd (dropped ones are forgotten).
    pub(crate) fn subscribe(&self, fd: &Arc<EventFd>) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|x| x.strong_count() > 0);
        w.push(Arc::downgrade(fd));
    }

    fn wake(&self) {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for fd in w.iter().filter_map(Weak::upgrade) {
            // A full counter (cannot happen: the worker reads it) or a
            // closed fd only loses a wake-up of a worker that is gone.
            let _ = fd.write(1);
        }
    }
}

/// The hook of a disk without CBT or CDP: does nothing, costs nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHook;

impl WriteHook for NoHook {}

/// Two hooks in a row (e.g. CBT and the CDP journal).
impl<A: WriteHook, B: WriteHook> WriteHook for (A, B) {
    fn on_write(&self, offset: u64, len: u64, data: &WriteData<'_>) {
        self.0.on_write(offset, len, data);
        self.1.on_write(offset, len, data);
    }
    fn on_discard(&self, offset: u64, len: u64) {
        self.0.on_discard(offset, len);
        self.1.on_discard(offset, len);
    }
    fn on_write_zeroes(&self, offset: u64, len: u64) {
        self.0.on_write_zeroes(offset, len);
        self.1.on_write_zeroes(offset, len);
    }
    fn on_flush(&self) {
        self.0.on_flush();
        self.1.on_flush();
    }
    fn gate(&self) -> Option<&CompletionGate> {
        self.0.gate().or_else(|| self.1.gate())
    }
}

impl<H: WriteHook> WriteHook for std::sync::Arc<H> {
    fn on_write(&self, offset: u64, len: u64, data: &WriteData<'_>) {
        (**self).on_write(offset, len, data);
    }
    fn on_discard(&self, offset: u64, len: u64) {
        (**self).on_discard(offset, len);
    }
    fn on_write_zeroes(&self, offset: u64, len: u64) {
        (**self).on_write_zeroes(offset, len);
    }
    fn on_flush(&self) {
        (**self).on_flush();
    }
    fn gate(&self) -> Option<&CompletionGate> {
        (**self).gate()
    }
}
