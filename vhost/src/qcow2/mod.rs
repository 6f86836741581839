//! qcow2 images (QEMU's `docs/interop/qcow2.txt`, versions 2 and 3): the
//! guest-to-host cluster map the I/O engine translates requests with, and
//! the metadata updates (allocation, discard, zeroing) around it.
//!
//! Written here rather than taken from a crate: the maintained ones
//! (`qcow2-rs`) are async/await libraries that own the data I/O; keel's
//! engine only needs the map, so guest data keeps going through the
//! worker's io_uring (no copy, no allocation) and only metadata work
//! happens here.
//!
//! # Design
//! - The whole L2 map is in memory as one flat array of atomics (8 bytes
//!   per guest cluster: 1.6 MiB for a 100 GiB disk of 64 KiB clusters, the
//!   "L2 cache sized for the disk"). Looking up a request is lock-free;
//!   allocation, discard and flush take the metadata mutex (rare: once
//!   per new cluster, per discard, per guest flush).
//! - New clusters are only ever taken past the end of the file, never
//!   reused, so a cluster is a hole (reads zeros) until written and a
//!   request in flight never sees its cluster change owner. Freed clusters
//!   are punched (their space returns to the filesystem).
//! - Metadata is written back at the guest's flush (the consistency point;
//!   virtio-blk has no FUA): refcount blocks first, a data sync, then L2
//!   tables and the L1 table, whose sync is the guest's own flush. A crash
//!   can so leak clusters (reported by `qemu-img check` as leaks) but never
//!   leave a reference to a cluster whose refcount is zero.
//! - A partly written new cluster whose old content is not zeros (backing
//!   file data, a compressed cluster) is first filled with that content.
//!
//! # Limits (refused at open with the reason)
//! Encryption, external data files, extended L2 entries, zstd compression,
//! refcounts other than 16 bits, writing to images with internal
//! snapshots or a dirty (lazy refcounts) flag, backing files without a
//! recorded format. Compressed clusters are read, and rewritten on write.

// Offsets and sizes are u64 on disk and index memory as usize: keel runs on
// 64-bit hosts only (io_uring), and every size is bounded at open.
#![allow(clippy::cast_possible_truncation)]

pub mod header;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use header::Header;

/// Host offset bits of L1 and L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount 1: writable in place.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeros.
const ZERO: u64 = 1;

/// Most guest clusters keel maps (the map is 8 bytes each: 512 MiB).
const MAX_GUEST_CLUSTERS: u64 = 1 << 26;
/// QEMU's limits on the L1 and refcount tables.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Backing chains longer than this are refused (and loops with them).
const MAX_CHAIN: usize = 16;
/// The file grows in steps of this much, allocated (a cluster past the end
/// must read as zeros right after it is handed out, before its data write
/// lands); the unused tail is trimmed at close.
const GROW_STEP: u64 = 8 << 20;

/// Errors of qcow2 images.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Reading or writing the image failed.
    #[error("I/O error on the qcow2 image")]
    Io(#[from] std::io::Error),
    /// The metadata is inconsistent.
    #[error("Corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// A feature keel does not implement.
    #[error("Unsupported qcow2 image: {0}")]
    Unsupported(String),
    /// No more clusters can be addressed.
    #[error("qcow2 image full: {0}")]
    Full(String),
    /// The backing file could not be opened.
    #[error("Cannot open backing file {path}")]
    Backing {
        /// Resolved backing file path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<Qcow2Error>,
    },
    /// Bad creation parameters.
    #[error("Invalid qcow2 parameters: {0}")]
    Invalid(String),
}

/// A qcow2 image's metadata, open for I/O.
#[derive(Debug)]
pub struct Qcow2 {
    /// Buffered handle for metadata and the synchronous slow path.
    file: File,
    cluster_bits: u32,
    version: u32,
    size: u64,
    readonly: bool,
    /// L2 entries of every guest cluster, as on disk (host endian).
    l2: Box<[AtomicU64]>,
    meta: Mutex<Meta>,
    backing: Option<Backing>,
}

#[derive(Debug)]
enum Backing {
    Raw { file: File, size: u64 },
    Qcow2(Box<Qcow2>),
}

impl Backing {
    fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(q) => q.size,
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        match self {
            Backing::Raw { file, .. } => Ok(pread_full(file, buf, offset)?),
            Backing::Qcow2(q) => q.read_at(offset, buf),
        }
    }
}

/// Metadata behind the mutex.
#[derive(Debug)]
struct Meta {
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: bool,
    l2_dirty: Vec<bool>,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_dirty: bool,
    /// Refcount of every host cluster (empty when read-only).
    refcounts: Vec<u16>,
    refblock_dirty: Vec<bool>,
    /// Next host cluster handed out (always past every used one).
    next_free: u64,
    /// Bytes the file is known to have.
    file_len: u64,
    /// One cluster, for serializing tables.
    scratch: Vec<u8>,
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file
/// read as zeros.
fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn corrupt(what: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Corrupt(what.into())
}

/// Parameters of a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size: a power of two from 64 KiB to 2 MiB.
    pub cluster_size: u64,
    /// Backing file (as written into the image: absolute, or relative to
    /// the image's directory) and its format (`raw` or `qcow2`).
    pub backing: Option<(String, String)>,
}

/// Creates a qcow2 v3 image at `path` (fails if it exists): header,
/// refcount table and block, and an L1 table; no data clusters.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), Qcow2Error> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(64 << 10..=2 << 20).contains(&cs) {
        return Err(Qcow2Error::Invalid(format!(
            "cluster size {cs} (a power of two from 64 KiB to 2 MiB)"
        )));
    }
    if opts.size == 0 || !opts.size.is_multiple_of(512) {
        return Err(Qcow2Error::Invalid(format!(
            "size {} is not a positive multiple of 512",
            opts.size
        )));
    }
    let bits = cs.trailing_zeros();
    let guest_clusters = opts.size.div_ceil(cs);
    if guest_clusters > MAX_GUEST_CLUSTERS {
        return Err(Qcow2Error::Invalid(format!("size {} too large", opts.size)));
    }
    let l2_entries = cs / 8;
    let l1_size = guest_clusters.div_ceil(l2_entries);
    // At least one whole cluster of L1, so the disk can grow in place.
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let (reftable, refblock, l1) = (1u64, 2u64, 3u64);
    let used = l1 + l1_clusters;
    if used > cs / 2 {
        return Err(Qcow2Error::Invalid("L1 table too large".into()));
    }
    let header = Header {
        version: 3,
        cluster_bits: bits,
        size: opts.size,
        l1_size: u32::try_from(l1_size).map_err(|_| Qcow2Error::Invalid("size".into()))?,
        l1_table_offset: l1 * cs,
        refcount_table_offset: reftable * cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        incompatible: 0,
        autoclear: 0,
        refcount_order: 4,
        header_length: header::V3_LEN,
        backing: opts
            .backing
            .as_ref()
            .map(|(name, format)| (name.clone(), Some(format.clone()))),
    };
    if let Some((_, format)) = &opts.backing {
        if format != "raw" && format != "qcow2" {
            return Err(Qcow2Error::Invalid(format!("backing format {format}")));
        }
    }
    let mut image = vec![0u8; (used * cs) as usize];
    header::write_v3(&header, &mut image[..cs as usize])?;
    let rt = (reftable * cs) as usize;
    image[rt..rt + 8].copy_from_slice(&(refblock * cs).to_be_bytes());
    let rb = (refblock * cs) as usize;
    for c in 0..used as usize {
        image[rb + 2 * c..rb + 2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all_at(&image, 0)?;
    file.sync_all()?;
    Ok(())
}

impl Qcow2 {
    /// Opens the image at `path` (and its backing chain, read-only).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, Qcow2Error> {
        Self::open_chain(path, readonly, 0)
    }

    fn open_chain(path: &Path, readonly: bool, depth: usize) -> Result<Self, Qcow2Error> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        let file_len = file.metadata()?.len();
        let mut head = vec![0u8; file_len.min(2 << 20) as usize];
        pread_full(&file, &mut head, 0)?;
        let h = Header::parse(&head)?;
        if !readonly {
            if h.incompatible & header::INCOMPAT_DIRTY != 0 {
                return Err(Qcow2Error::Unsupported(
                    "the dirty flag is set (lazy refcounts after a crash): run `qemu-img check -r all` first".into(),
                ));
            }
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(corrupt("marked corrupt by QEMU"));
            }
            if h.nb_snapshots != 0 {
                return Err(Qcow2Error::Unsupported(
                    "writing to an image with internal snapshots".into(),
                ));
            }
        }
        let cs = h.cluster_size();
        let guest_clusters = h.size.div_ceil(cs);
        if guest_clusters > MAX_GUEST_CLUSTERS {
            return Err(Qcow2Error::Unsupported(format!(
                "a virtual size of {}",
                h.size
            )));
        }
        let l1_needed = guest_clusters.div_ceil(cs / 8);
        let l1_size = u64::from(h.l1_size);
        if l1_size < l1_needed || l1_size * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "l1_size {l1_size} for {guest_clusters} clusters"
            )));
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        pread_full(&file, &mut raw, h.l1_table_offset)?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let mut highest = (h.l1_table_offset + l1_size * 8).div_ceil(cs);
        let l2 = zeroed_map(guest_clusters as usize);
        let mut table = vec![0u8; cs as usize];
        let per_l2 = cs / 8;
        for (i, &e) in l1.iter().enumerate().take(l1_needed as usize) {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(corrupt(format!("L2 table at unaligned offset {off:#x}")));
            }
            highest = highest.max(off / cs + 1);
            pread_full(&file, &mut table, off)?;
            let first = i as u64 * per_l2;
            for (k, c) in table.chunks_exact(8).enumerate() {
                let g = first + k as u64;
                if g >= guest_clusters {
                    break;
                }
                let entry = u64::from_be_bytes(c.try_into().unwrap_or_default());
                if entry & COMPRESSED == 0 {
                    let host = entry & OFFSET_MASK;
                    if !host.is_multiple_of(cs) {
                        return Err(corrupt(format!(
                            "cluster {g} at unaligned host offset {host:#x}"
                        )));
                    }
                    if entry & ZERO != 0 && h.version < 3 {
                        return Err(corrupt("zero cluster flag in a version 2 image"));
                    }
                    if host != 0 {
                        highest = highest.max(host / cs + 1);
                    }
                } else {
                    let (off, len) = compressed_extent(entry, h.cluster_bits);
                    highest = highest.max((off + len).div_ceil(cs));
                }
                l2[g as usize].store(entry, Ordering::Relaxed);
            }
        }
        let reftable_bytes = u64::from(h.refcount_table_clusters) * cs;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt("refcount table too large"));
        }
        highest = highest.max((h.refcount_table_offset + reftable_bytes).div_ceil(cs));
        let mut meta = Meta {
            l1,
            l1_offset: h.l1_table_offset,
            l1_dirty: false,
            l2_dirty: vec![false; l1_needed as usize],
            reftable: Vec::new(),
            reftable_offset: h.refcount_table_offset,
            reftable_dirty: false,
            refcounts: Vec::new(),
            refblock_dirty: Vec::new(),
            next_free: 0,
            file_len,
            scratch: table,
        };
        if !readonly {
            meta.load_refcounts(&file, &h, &mut highest)?;
        }
        // Everything referenced must exist (a compressed cluster's last
        // sector may end in the file's last partial cluster).
        if highest > file_len.div_ceil(cs) + 1 {
            return Err(corrupt("metadata points past the end of the file"));
        }
        if !readonly {
            // Never hand out a cluster something still points at, nor
            // one holding old bytes past the last referenced one.
            meta.next_free = highest.max(file_len.div_ceil(cs));
            check_copied(&mut meta, &l2, cs)?;
            if h.version == 3 && h.autoclear != 0 {
                // Unknown autoclear extensions (e.g. persistent bitmaps)
                // are stale once keel writes: clear them, as QEMU does.
                file.write_all_at(&0u64.to_be_bytes(), header::AUTOCLEAR_OFFSET)?;
            }
        }
        let backing = match &h.backing {
            None => None,
            Some((name, format)) => {
                let resolved = resolve(path, name);
                let open = || -> Result<Backing, Qcow2Error> {
                    if depth + 1 >= MAX_CHAIN {
                        return Err(Qcow2Error::Unsupported(format!(
                            "a backing chain longer than {MAX_CHAIN}"
                        )));
                    }
                    match format.as_deref() {
                        Some("raw") => {
                            let file = File::open(&resolved)?;
                            let size = file.metadata()?.len();
                            Ok(Backing::Raw { file, size })
                        }
                        Some("qcow2") => Ok(Backing::Qcow2(Box::new(Self::open_chain(
                            &resolved,
                            true,
                            depth + 1,
                        )?))),
                        Some(f) => Err(Qcow2Error::Unsupported(format!("backing format {f}"))),
                        None => Err(Qcow2Error::Unsupported(
                            "a backing file without a recorded format".into(),
                        )),
                    }
                };
                Some(open().map_err(|e| Qcow2Error::Backing {
                    path: resolved.clone(),
                    source: Box::new(e),
                })?)
            }
        };
        Ok(Self {
            file,
            cluster_bits: h.cluster_bits,
            version: h.version,
            size: h.size,
            readonly,
            l2,
            meta: Mutex::new(meta),
            backing,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock cannot leave the map half
        // updated in a way a reader could not handle; keep serving.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, g: u64) -> u64 {
        usize::try_from(g)
            .ok()
            .and_then(|g| self.l2.get(g))
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// Host offset of guest bytes `[offset, offset + len)` when they lie
    /// in one contiguous run of data clusters (writable in place when
    /// `write`), so one I/O serves them. Lock-free.
    pub fn map(&self, offset: u64, len: u64, write: bool) -> Option<u64> {
        if len == 0 || offset.checked_add(len)? > self.size {
            return None;
        }
        let mask = self.cs() - 1;
        let (first, last) = (
            offset >> self.cluster_bits,
            (offset + len - 1) >> self.cluster_bits,
        );
        let mut start = 0;
        let mut expect = 0;
        for g in first..=last {
            let e = self.entry(g);
            let host = e & OFFSET_MASK;
            if host == 0 || e & (COMPRESSED | ZERO) != 0 || (write && e & COPIED == 0) {
                return None;
            }
            if g == first {
                start = host + (offset & mask);
            } else if host != expect {
                return None;
            }
            expect = host + self.cs();
        }
        Some(start)
    }

    /// Reads guest bytes at `offset` into `buf` cluster by cluster (zeros,
    /// backing data, compressed clusters): the slow path.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos & (cs - 1);
            let n = ((cs - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            done += n;
            if pos >= self.size {
                out.fill(0);
                continue;
            }
            let e = self.entry(pos >> self.cluster_bits);
            if e & COMPRESSED != 0 {
                let data = self.decompress(e)?;
                out.copy_from_slice(&data[within as usize..within as usize + n]);
            } else if e & ZERO != 0 {
                out.fill(0);
            } else if e & OFFSET_MASK != 0 {
                pread_full(&self.file, out, (e & OFFSET_MASK) + within)?;
            } else {
                self.read_backing(pos, out)?;
            }
        }
        Ok(())
    }

    fn read_backing(&self, pos: u64, out: &mut [u8]) -> Result<(), Qcow2Error> {
        match &self.backing {
            Some(b) if pos < b.size() => {
                let n = ((b.size() - pos) as usize).min(out.len());
                b.read_at(pos, &mut out[..n])?;
                out[n..].fill(0);
                Ok(())
            }
            _ => {
                out.fill(0);
                Ok(())
            }
        }
    }

    fn decompress(&self, entry: u64) -> Result<Vec<u8>, Qcow2Error> {
        let (off, len) = compressed_extent(entry, self.cluster_bits);
        let mut raw = vec![0u8; len as usize];
        pread_full(&self.file, &mut raw, off)?;
        let cs = self.cs() as usize;
        let mut out = miniz_oxide::inflate::decompress_to_vec_with_limit(&raw, cs)
            .map_err(|e| corrupt(format!("compressed cluster at {off:#x}: {e:?}")))?;
        out.resize(cs, 0);
        Ok(out)
    }

    /// Writes guest bytes through the slow path (allocating as needed).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        self.prepare_write(offset, data.len() as u64)?;
        let cs = self.cs();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let n = ((cs - (pos & (cs - 1))) as usize).min(data.len() - done);
            let host = self
                .map(pos, n as u64, true)
                .ok_or_else(|| corrupt("cluster not writable after allocation"))?;
            self.file.write_all_at(&data[done..done + n], host)?;
            done += n;
        }
        Ok(())
    }

    /// Makes every cluster of guest `[offset, offset + len)` writable in
    /// place: allocates new clusters (filled with their old content when
    /// it is not zeros and the write covers them only partly).
    pub fn prepare_write(&self, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        if self.readonly {
            return Err(Qcow2Error::Invalid("the image is read-only".into()));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size && len > 0)
            .ok_or_else(|| Qcow2Error::Invalid(format!("write at {offset}+{len}")))?;
        let mut meta = self.lock();
        let cs = self.cs();
        for g in (offset >> self.cluster_bits)..=((end - 1) >> self.cluster_bits) {
            let start = g << self.cluster_bits;
            let from = offset.max(start) - start;
            let to = end.min(start + cs) - start;
            self.make_writable(&mut meta, g, from == 0 && to == cs)?;
        }
        Ok(())
    }

    /// One cluster of [`Self::prepare_write`]; `whole` when the write
    /// covers all of it (its old content does not matter then).
    fn make_writable(&self, meta: &mut Meta, g: u64, whole: bool) -> Result<(), Qcow2Error> {
        let e = self.entry(g);
        let host = e & OFFSET_MASK;
        if host != 0 && e & (COMPRESSED | ZERO | COPIED) == COPIED {
            return Ok(());
        }
        let cs = self.cs();
        if host != 0 && e & (COMPRESSED | COPIED) == COPIED {
            // A preallocated zero cluster: zero it in place.
            if !whole {
                fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, host, cs)?;
            }
            return self.set_entry(meta, g, host | COPIED);
        }
        let new = self.alloc_data(meta, g)?;
        if !whole {
            // Old content that is not zeros goes into the new cluster first
            // (new clusters are holes: zeros cost nothing).
            let old_is_zero = e & ZERO != 0
                || (e == 0
                    && self
                        .backing
                        .as_ref()
                        .is_none_or(|b| g << self.cluster_bits >= b.size()));
            if !old_is_zero {
                let mut buf = std::mem::take(&mut meta.scratch);
                let read = self.read_at(g << self.cluster_bits, &mut buf);
                let written = read.and_then(|()| {
                    if buf.iter().any(|&b| b != 0) {
                        self.file.write_all_at(&buf, new)?;
                    }
                    Ok(())
                });
                meta.scratch = buf;
                written?;
            }
        }
        self.release(meta, e)?;
        self.set_entry(meta, g, new | COPIED)
    }

    fn set_entry(&self, meta: &mut Meta, g: u64, entry: u64) -> Result<(), Qcow2Error> {
        let slot = usize::try_from(g)
            .ok()
            .and_then(|i| self.l2.get(i))
            .ok_or_else(|| corrupt(format!("guest cluster {g} out of range")))?;
        slot.store(entry, Ordering::Release);
        let t = (g / (self.cs() / 8)) as usize;
        if let Some(d) = meta.l2_dirty.get_mut(t) {
            *d = true;
        }
        Ok(())
    }

    /// Drops the reference an old L2 entry held.
    fn release(&self, meta: &mut Meta, e: u64) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        if e & COMPRESSED != 0 {
            let (off, len) = compressed_extent(e, self.cluster_bits);
            for c in off / cs..(off + len).div_ceil(cs) {
                meta.unref(&self.file, c, cs)?;
            }
        } else if e & OFFSET_MASK != 0 {
            meta.unref(&self.file, (e & OFFSET_MASK) / cs, cs)?;
        }
        Ok(())
    }

    /// A new data cluster for guest cluster `g` (and its L2 table if it
    /// has none yet); returns its host offset.
    fn alloc_data(&self, meta: &mut Meta, g: u64) -> Result<u64, Qcow2Error> {
        let cs = self.cs();
        let t = (g / (cs / 8)) as usize;
        if meta.l1.get(t).is_some_and(|&e| e & OFFSET_MASK == 0) {
            let table = meta.alloc_cluster(&self.file, cs)?;
            meta.l1[t] = (table * cs) | COPIED;
            meta.l1_dirty = true;
            if let Some(d) = meta.l2_dirty.get_mut(t) {
                *d = true;
            }
        }
        Ok(meta.alloc_cluster(&self.file, cs)? * cs)
    }

    /// Discards (`zero` false) or zeroes guest `[offset, offset + len)`.
    /// Whole clusters are unmapped (reading as zeros afterwards, unless a
    /// discard on a version 2 image over a backing file, where that cannot
    /// be expressed: those keep their data, as a discard allows); partial
    /// ones are zeroed only for `zero`.
    pub fn discard(
        &self,
        offset: u64,
        len: u64,
        zero: bool,
        unmap: bool,
    ) -> Result<(), Qcow2Error> {
        if self.readonly {
            return Err(Qcow2Error::Invalid("the image is read-only".into()));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Qcow2Error::Invalid(format!("discard at {offset}+{len}")))?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs();
        let mut meta = self.lock();
        for g in (offset >> self.cluster_bits)..=((end - 1) >> self.cluster_bits) {
            let start = g << self.cluster_bits;
            let from = offset.max(start) - start;
            let to = end.min(start + cs) - start;
            let e = self.entry(g);
            let backed = self.backing.as_ref().is_some_and(|b| start < b.size());
            let reads_zero = e & ZERO != 0 || (e == 0 && !backed);
            if from != 0 || to != cs {
                if zero && !reads_zero {
                    self.make_writable(&mut meta, g, false)?;
                    let host = self.entry(g) & OFFSET_MASK;
                    fallocate(
                        &self.file,
                        libc::FALLOC_FL_ZERO_RANGE,
                        host + from,
                        to - from,
                    )?;
                }
                continue;
            }
            let host = e & OFFSET_MASK;
            if zero && !unmap && host != 0 && e & (COMPRESSED | ZERO | COPIED) == COPIED {
                // Keep the allocation, as the guest asked.
                fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, host, cs)?;
                continue;
            }
            if self.version < 3 && backed {
                if zero {
                    self.make_writable(&mut meta, g, true)?;
                    let host = self.entry(g) & OFFSET_MASK;
                    fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, host, cs)?;
                }
                continue;
            }
            let new = if backed { ZERO } else { 0 };
            if e != new {
                self.release(&mut meta, e)?;
                self.set_entry(&mut meta, g, new)?;
            }
        }
        Ok(())
    }

    /// Writes the changed metadata back (refcounts, a data sync, then L2
    /// and L1 tables). The caller's own data sync makes the tables durable.
    pub fn flush(&self) -> Result<(), Qcow2Error> {
        if self.readonly {
            return Ok(());
        }
        let mut meta = self.lock();
        meta.write_refcounts(&self.file, self.cs())?;
        let m = &mut *meta;
        let per_l2 = (self.cs() / 8) as usize;
        for t in 0..m.l2_dirty.len() {
            if !m.l2_dirty[t] {
                continue;
            }
            let off = m.l1[t] & OFFSET_MASK;
            m.scratch.fill(0);
            for (k, out) in m.scratch.chunks_exact_mut(8).enumerate() {
                let Some(e) = self.l2.get(t * per_l2 + k) else {
                    break;
                };
                out.copy_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
            }
            self.file.write_all_at(&m.scratch, off)?;
            m.l2_dirty[t] = false;
        }
        if m.l1_dirty {
            let bytes: Vec<u8> = m.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_all_at(&bytes, m.l1_offset)?;
            m.l1_dirty = false;
        }
        Ok(())
    }

    /// Writes the metadata back and syncs the image.
    pub fn sync(&self) -> Result<(), Qcow2Error> {
        self.flush()?;
        Ok(self.file.sync_data()?)
    }

    /// Flushes the metadata, syncs, and trims the unused tail the file
    /// grew by (for a clean shutdown).
    pub fn close(&self) -> Result<(), Qcow2Error> {
        if self.readonly {
            return Ok(());
        }
        self.flush()?;
        let mut meta = self.lock();
        let end = meta.next_free * self.cs();
        if meta.file_len > end {
            self.file.set_len(end)?;
            meta.file_len = end;
        }
        self.file.sync_all()?;
        Ok(())
    }
}

/// A map of `n` zero entries from zeroed pages: untouched (unallocated)
/// entries cost no memory, so a sparse image's map stays small.
fn zeroed_map(n: usize) -> Box<[AtomicU64]> {
    let zeros: Box<[u64]> = vec![0u64; n].into_boxed_slice();
    // SAFETY: AtomicU64 has the same size, alignment and bit validity as
    // u64 (documented), so a boxed slice of one is a boxed slice of the
    // other; ownership moves from `zeros` to the result.
    unsafe { Box::from_raw(Box::into_raw(zeros) as *mut [AtomicU64]) }
}

/// Host byte range of a compressed cluster's data.
fn compressed_extent(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let off = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (off, (sectors * 512).saturating_sub(off & 511))
}

/// Resolves a backing file name as QEMU does: relative to the image.
fn resolve(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_owned()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Checks every reference of a writable image has refcount 1 (else writes
/// would need copy-on-write keel does not do) and marks it COPIED.
fn check_copied(meta: &mut Meta, l2: &[AtomicU64], cs: u64) -> Result<(), Qcow2Error> {
    let count = |meta: &Meta, host: u64| {
        meta.refcounts
            .get((host / cs) as usize)
            .copied()
            .unwrap_or(0)
    };
    for i in 0..meta.l1.len().min(meta.l2_dirty.len()) {
        let host = meta.l1[i] & OFFSET_MASK;
        if host == 0 {
            continue;
        }
        match count(meta, host) {
            1 => meta.l1[i] |= COPIED,
            0 => return Err(corrupt(format!("L2 table at {host:#x} has refcount 0"))),
            _ => {
                return Err(Qcow2Error::Unsupported(
                    "shared L2 tables (internal snapshots)".into(),
                ))
            }
        }
    }
    for e in l2 {
        let v = e.load(Ordering::Relaxed);
        let host = v & OFFSET_MASK;
        if v & COMPRESSED != 0 || host == 0 {
            continue;
        }
        match count(meta, host) {
            1 => e.store(v | COPIED, Ordering::Relaxed),
            0 => return Err(corrupt(format!("data cluster at {host:#x} has refcount 0"))),
            _ => {
                return Err(Qcow2Error::Unsupported(
                    "shared data clusters (internal snapshots)".into(),
                ))
            }
        }
    }
    Ok(())
}

impl Meta {
    fn per_block(cs: u64) -> u64 {
        cs / 2
    }

    fn load_refcounts(
        &mut self,
        file: &File,
        h: &Header,
        highest: &mut u64,
    ) -> Result<(), Qcow2Error> {
        let cs = h.cluster_size();
        let mut raw = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        pread_full(file, &mut raw, h.refcount_table_offset)?;
        self.reftable = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()) & !0x1ff)
            .collect();
        self.refblock_dirty = vec![false; self.reftable.len()];
        let per = Self::per_block(cs);
        // Refcounts past the file's end describe nothing; do not load them.
        let limit = self.file_len.div_ceil(cs).max(*highest);
        let mut block = vec![0u8; cs as usize];
        for (i, &off) in self.reftable.iter().enumerate() {
            if off == 0 || i as u64 * per >= limit {
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(corrupt(format!(
                    "refcount block at unaligned offset {off:#x}"
                )));
            }
            *highest = (*highest).max(off / cs + 1);
            pread_full(file, &mut block, off)?;
            let first = i * per as usize;
            if self.refcounts.len() < first + per as usize {
                self.refcounts.resize(first + per as usize, 0);
            }
            for (k, c) in block.chunks_exact(2).enumerate() {
                self.refcounts[first + k] = u16::from_be_bytes([c[0], c[1]]);
            }
        }
        if let Some(last) = self.refcounts.iter().rposition(|&r| r != 0) {
            *highest = (*highest).max(last as u64 + 1);
        }
        Ok(())
    }

    /// Takes the next cluster past the end; gives the refcount block that
    /// covers it a cluster of its own first when it has none.
    fn alloc_cluster(&mut self, file: &File, cs: u64) -> Result<u64, Qcow2Error> {
        let per = Self::per_block(cs);
        loop {
            let c = self.next_free;
            let block = (c / per) as usize;
            if block >= self.reftable.len() {
                return Err(Qcow2Error::Full("the refcount table is full".into()));
            }
            self.next_free += 1;
            let end = self.next_free * cs;
            if end > self.file_len {
                let grown = end.next_multiple_of(GROW_STEP.max(cs));
                // Allocated, not just a longer file: a direct write into a
                // hole must allocate blocks, which io_uring cannot do
                // inline (it hands such writes to its worker threads, one
                // at a time per file). Measured: allocating 4 KiB writes
                // at QD32 0.63x keel raw with set_len, 1.14x with this.
                if let Err(e) = fallocate(file, 0, self.file_len, grown - self.file_len) {
                    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                        return Err(e.into());
                    }
                    file.set_len(grown)?;
                }
                self.file_len = grown;
            }
            if self.refcounts.len() <= c as usize {
                self.refcounts.resize((block + 1) * per as usize, 0);
            }
            self.refcounts[c as usize] = 1;
            self.refblock_dirty[block] = true;
            if self.reftable[block] == 0 {
                // The new block sits in the range it counts, counting itself.
                self.reftable[block] = c * cs;
                self.reftable_dirty = true;
                continue;
            }
            return Ok(c);
        }
    }

    fn unref(&mut self, file: &File, c: u64, cs: u64) -> Result<(), Qcow2Error> {
        let Some(r) = self.refcounts.get_mut(c as usize) else {
            return Ok(());
        };
        *r = r.saturating_sub(1);
        if *r == 0 {
            fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                c * cs,
                cs,
            )?;
        }
        let block = (c / Self::per_block(cs)) as usize;
        if let Some(d) = self.refblock_dirty.get_mut(block) {
            *d = true;
        }
        Ok(())
    }

    fn write_refcounts(&mut self, file: &File, cs: u64) -> Result<(), Qcow2Error> {
        let per = Self::per_block(cs) as usize;
        let mut any = false;
        for b in 0..self.refblock_dirty.len() {
            if !self.refblock_dirty[b] {
                continue;
            }
            let off = self.reftable[b];
            self.scratch.fill(0);
            for (k, out) in self.scratch.chunks_exact_mut(2).enumerate() {
                let Some(r) = self.refcounts.get(b * per + k) else {
                    break;
                };
                out.copy_from_slice(&r.to_be_bytes());
            }
            file.write_all_at(&self.scratch, off)?;
            self.refblock_dirty[b] = false;
            any = true;
        }
        if self.reftable_dirty {
            let bytes: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
            file.write_all_at(&bytes, self.reftable_offset)?;
            self.reftable_dirty = false;
            any = true;
        }
        if any {
            // Refcounts reach the disk before any table pointing at them.
            file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
