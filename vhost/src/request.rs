//! virtio-blk request parsing: turns one descriptor chain, fully controlled
//! by a possibly hostile guest, into a validated [`Request`] or a
//! [`ParseError`] that names the broken invariant.
//!
//! Every guest number is checked: descriptor addresses and lengths go
//! through vm-memory's checked accessors, sector ranges use checked
//! arithmetic against the capacity. Nothing here panics on guest input.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::config::MAX_DISCARD_SEGS;
use crate::disk::SECTOR_SIZE;

/// Host iovecs per request (more than `SEG_MAX`: a descriptor may span
/// guest memory regions and then needs several iovecs).
pub const MAX_IOVECS: usize = 256;
/// Bytes of a virtio-blk request header.
const HEADER_LEN: u32 = 16;
/// Bytes of one discard / write-zeroes segment.
const DISCARD_SEG_LEN: u32 = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// Status byte values.
pub const STATUS_OK: u8 = 0;
/// I/O error.
pub const STATUS_IOERR: u8 = 1;
/// Unsupported request.
pub const STATUS_UNSUPP: u8 = 2;

/// Why a request was refused. [`ParseError::status`] maps it to the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain has no writable last descriptor for the status byte.
    #[error("No writable status descriptor")]
    NoStatusDescriptor,
    /// The first descriptor is writable or shorter than the header.
    #[error("Invalid header descriptor")]
    HeaderDescriptor,
    /// The header could not be read from guest memory.
    #[error("Header outside guest memory")]
    ReadHeader,
    /// Unknown request type.
    #[error("Unsupported request type {0}")]
    UnsupportedType(u32),
    /// Write-like request to a read-only disk.
    #[error("Write to read-only disk")]
    ReadOnly,
    /// The disk failed an earlier flush.
    #[error("Disk failed")]
    DiskFailed,
    /// A data descriptor has the wrong direction for the request type.
    #[error("Data descriptor direction")]
    DataDirection,
    /// More data segments than we can hold.
    #[error("Too many segments")]
    TooManySegments,
    /// A data descriptor points outside guest memory.
    #[error("Data descriptor outside guest memory")]
    GuestMemory,
    /// Data length not a multiple of the sector size.
    #[error("Data length {0} not a multiple of 512")]
    UnalignedLength(u64),
    /// The sector range ends past the disk (or overflows).
    #[error("Sector range past the end of the disk")]
    OutOfRange,
    /// Discard / write-zeroes payload is not whole segments.
    #[error("Malformed discard segments")]
    SegmentLayout,
    /// Reserved flags set in a discard / write-zeroes segment.
    #[error("Unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    /// The GET_ID buffer could not be written.
    #[error("Cannot write device id")]
    WriteId,
}

impl ParseError {
    /// The virtio status to report, or `None` when there is no place to
    /// put one (the request is returned with used length 0).
    pub fn status(self) -> Option<u8> {
        match self {
            ParseError::NoStatusDescriptor => None,
            ParseError::UnsupportedType(_) | ParseError::UnsupportedFlags(_) => Some(STATUS_UNSUPP),
            ParseError::HeaderDescriptor
            | ParseError::ReadHeader
            | ParseError::ReadOnly
            | ParseError::DiskFailed
            | ParseError::DataDirection
            | ParseError::TooManySegments
            | ParseError::GuestMemory
            | ParseError::UnalignedLength(_)
            | ParseError::OutOfRange
            | ParseError::SegmentLayout
            | ParseError::WriteId => Some(STATUS_IOERR),
        }
    }
}

/// Request types we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN
    Read,
    /// VIRTIO_BLK_T_OUT
    Write,
    /// VIRTIO_BLK_T_FLUSH
    Flush,
    /// VIRTIO_BLK_T_GET_ID (answered during parsing)
    GetId,
    /// VIRTIO_BLK_T_DISCARD
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES
    WriteZeroes,
}

impl RequestKind {
    /// Whether the request changes the disk or its durability (what the
    /// write hook sees and a completion gate holds).
    pub fn modifies(self) -> bool {
        !matches!(self, RequestKind::Read | RequestKind::GetId)
    }
}

/// One discard / write-zeroes range, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Write-zeroes may deallocate.
    pub unmap: bool,
}

/// iovecs into guest memory. Raw pointers are not `Send`; these point into
/// guest memory mappings that outlive the request and are only used by
/// the worker that owns the slot.
pub struct IoVecs(pub(crate) Vec<libc::iovec>);

// SAFETY: the pointers reference shared guest memory mappings (not thread
// local data); the slot holding them is owned by one worker at a time.
unsafe impl Send for IoVecs {}

/// What the disk looks like to the parser.
#[derive(Debug, Clone, Copy)]
pub struct DiskView<'a> {
    /// Capacity in sectors.
    pub sectors: u64,
    /// Refuse write-like requests.
    pub readonly: bool,
    /// Refuse everything.
    pub failed: bool,
    /// GET_ID answer.
    pub serial: &'a [u8; ID_LEN],
}

/// A parsed request: a pre-allocated slot reused for every request, so
/// parsing allocates nothing.
pub struct Request {
    /// Descriptor chain head (for the used ring).
    pub head: u16,
    /// Type.
    pub kind: RequestKind,
    /// Byte offset on disk (read/write).
    pub offset: u64,
    /// Data bytes (read/write), answer bytes (GET_ID).
    pub len: u64,
    /// Guest buffers (read/write).
    pub iovecs: IoVecs,
    /// Discard / write-zeroes ranges; `nsegs` are valid.
    pub segments: [Segment; MAX_DISCARD_SEGS as usize],
    /// Valid entries in `segments`.
    pub nsegs: usize,
    /// Where the status byte goes.
    pub status_addr: Option<GuestAddress>,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            head: 0,
            kind: RequestKind::Flush,
            offset: 0,
            len: 0,
            iovecs: IoVecs(Vec::with_capacity(MAX_IOVECS)),
            segments: [Segment::default(); MAX_DISCARD_SEGS as usize],
            nsegs: 0,
            status_addr: None,
        }
    }
}

impl Request {
    /// Bytes the device wrote into guest buffers, status byte included.
    pub fn used_len(&self, status: u8) -> u32 {
        let data = match self.kind {
            RequestKind::Read | RequestKind::GetId if status == STATUS_OK => self.len,
            _ => 0,
        };
        u32::try_from(data.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Parses the chain starting at `head` into `self`.
    ///
    /// hot path: no allocation (iovecs and segments are pre-allocated).
    pub fn parse<M, I>(
        &mut self,
        head: u16,
        mut descs: I,
        mem: &M,
        disk: &DiskView<'_>,
    ) -> Result<(), ParseError>
    where
        M: GuestMemory + ?Sized,
        I: Iterator<Item = Descriptor>,
    {
        self.head = head;
        self.status_addr = None;
        self.iovecs.0.clear();
        self.nsegs = 0;
        self.len = 0;
        self.offset = 0;

        // The status descriptor is the last one, so it is only known at the
        // end: handle data descriptors one behind. The chain is walked to
        // its end even after an error so the status can still be reported
        // (virtio-queue bounds the walk: loops end at the queue size).
        let header = descs.next().ok_or(ParseError::NoStatusDescriptor)?;
        let header = self.read_header(&header, mem, disk);
        let mut error = header.err();
        let mut pending: Option<Descriptor> = None;
        for d in descs {
            if let Some(prev) = pending.replace(d) {
                if let (None, Ok((kind, _))) = (error, header) {
                    error = self.add_data(kind, &prev, mem).err();
                }
            }
        }
        let status = pending;
        // Status: last descriptor, writable, at least one byte; the status
        // is its final byte.
        let status = status.ok_or(ParseError::NoStatusDescriptor)?;
        if !status.is_write_only() || status.len() == 0 {
            return Err(ParseError::NoStatusDescriptor);
        }
        let status_addr = status
            .addr()
            .checked_add(u64::from(status.len()) - 1)
            .ok_or(ParseError::NoStatusDescriptor)?;
        if !mem.check_range(status_addr, 1, Permissions::Write) {
            return Err(ParseError::NoStatusDescriptor);
        }
        self.status_addr = Some(status_addr);
        if let Some(e) = error {
            return Err(e);
        }
        let (kind, sector) = header?;
        self.finish(kind, sector, mem, disk)
    }

    fn read_header<M: GuestMemory + ?Sized>(
        &mut self,
        header: &Descriptor,
        mem: &M,
        disk: &DiskView<'_>,
    ) -> Result<(RequestKind, u64), ParseError> {
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Err(ParseError::HeaderDescriptor);
        }
        let mut h = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut h, header.addr())
            .map_err(|_| ParseError::ReadHeader)?;
        let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let kind = match ty {
            VIRTIO_BLK_T_IN => RequestKind::Read,
            VIRTIO_BLK_T_OUT => RequestKind::Write,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => return Err(ParseError::UnsupportedType(other)),
        };
        if disk.failed {
            return Err(ParseError::DiskFailed);
        }
        let writes = matches!(
            kind,
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes
        );
        if writes && disk.readonly {
            return Err(ParseError::ReadOnly);
        }
        self.kind = kind;
        Ok((kind, sector))
    }

    fn add_data<M: GuestMemory + ?Sized>(
        &mut self,
        kind: RequestKind,
        d: &Descriptor,
        mem: &M,
    ) -> Result<(), ParseError> {
        let device_writes = matches!(kind, RequestKind::Read | RequestKind::GetId);
        if d.is_write_only() != device_writes {
            return Err(ParseError::DataDirection);
        }
        match kind {
            RequestKind::Flush => Ok(()), // payload ignored
            RequestKind::Read | RequestKind::Write => {
                let perm = if device_writes {
                    Permissions::Write
                } else {
                    Permissions::Read
                };
                let len = usize::try_from(d.len()).map_err(|_| ParseError::GuestMemory)?;
                let slices = mem
                    .get_slices(d.addr(), len, perm)
                    .map_err(|_| ParseError::GuestMemory)?;
                let mut covered = 0usize;
                for s in slices
                    .stop_on_error()
                    .map_err(|_| ParseError::GuestMemory)?
                {
                    if self.iovecs.0.len() == MAX_IOVECS {
                        return Err(ParseError::TooManySegments);
                    }
                    covered += s.len();
                    self.iovecs.0.push(libc::iovec {
                        iov_base: s.ptr_guard_mut().as_ptr().cast(),
                        iov_len: s.len(),
                    });
                }
                if covered != len {
                    return Err(ParseError::GuestMemory);
                }
                self.len = self.len.saturating_add(u64::from(d.len()));
                Ok(())
            }
            RequestKind::GetId => {
                // Answer into the first data descriptor only.
                if self.len == 0 && d.len() > 0 {
                    let n = (d.len() as usize).min(ID_LEN);
                    self.offset = d.addr().raw_value();
                    self.len = n as u64;
                }
                Ok(())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if !d.len().is_multiple_of(DISCARD_SEG_LEN) {
                    return Err(ParseError::SegmentLayout);
                }
                for i in 0..d.len() / DISCARD_SEG_LEN {
                    if self.nsegs == MAX_DISCARD_SEGS as usize {
                        return Err(ParseError::TooManySegments);
                    }
                    let addr = d
                        .addr()
                        .checked_add(u64::from(i * DISCARD_SEG_LEN))
                        .ok_or(ParseError::GuestMemory)?;
                    let mut raw = [0u8; DISCARD_SEG_LEN as usize];
                    mem.read_slice(&mut raw, addr)
                        .map_err(|_| ParseError::GuestMemory)?;
                    let sector = u64::from_le_bytes([
                        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
                    ]);
                    let num = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
                    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
                    let allowed = if kind == RequestKind::WriteZeroes {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    } else {
                        0
                    };
                    if flags & !allowed != 0 {
                        return Err(ParseError::UnsupportedFlags(flags));
                    }
                    if num > crate::config::MAX_DISCARD_SECTORS {
                        return Err(ParseError::OutOfRange);
                    }
                    self.segments[self.nsegs] = Segment {
                        offset: sector,
                        len: u64::from(num),
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    };
                    self.nsegs += 1;
                }
                Ok(())
            }
        }
    }

    fn finish<M: GuestMemory + ?Sized>(
        &mut self,
        kind: RequestKind,
        sector: u64,
        mem: &M,
        disk: &DiskView<'_>,
    ) -> Result<(), ParseError> {
        match kind {
            RequestKind::Read | RequestKind::Write => {
                if !self.len.is_multiple_of(SECTOR_SIZE) {
                    return Err(ParseError::UnalignedLength(self.len));
                }
                self.offset = check_range(sector, self.len / SECTOR_SIZE, disk.sectors)?;
                Ok(())
            }
            RequestKind::Flush => Ok(()),
            RequestKind::GetId => {
                let n = usize::try_from(self.len).map_err(|_| ParseError::WriteId)?;
                if n > 0 {
                    mem.write_slice(&disk.serial[..n], GuestAddress(self.offset))
                        .map_err(|_| ParseError::WriteId)?;
                }
                Ok(())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.nsegs == 0 {
                    return Err(ParseError::SegmentLayout);
                }
                for seg in &mut self.segments[..self.nsegs] {
                    let sectors = seg.len;
                    seg.offset = check_range(seg.offset, sectors, disk.sectors)?;
                    seg.len = sectors * SECTOR_SIZE; // ≤ MAX_DISCARD_SECTORS * 512
                }
                Ok(())
            }
        }
    }
}

/// Byte offset of `sector` when `sector + count` fits in `capacity`.
fn check_range(sector: u64, count: u64, capacity: u64) -> Result<u64, ParseError> {
    let end = sector.checked_add(count).ok_or(ParseError::OutOfRange)?;
    if end > capacity {
        return Err(ParseError::OutOfRange);
    }
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(ParseError::OutOfRange)
}

#[cfg(test)]
mod tests;
