//! The write-path hook: the one seam every completed guest write, discard,
//! write-zeroes and flush passes through (CBT and, later, the CDP journal).
//!
//! The device is generic over the hook, so [`NoHook`] compiles to nothing:
//! zero cost when unused.

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
}
