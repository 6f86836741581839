//! Changed-block tracking: dirty bitmaps per disk, fed by the write hook.
//!
//! # Design
//! - One bit per granule (default 64 KiB). A disk has up to
//!   [`MAX_BITMAPS`] named bitmaps (one per backup chain); every completed
//!   write, discard and write-zeroes sets its granules in all of them.
//! - Bits are set on *completion* (the hook runs after the I/O), so a bit
//!   swapped out by [`Cbt::freeze_and_reset`] always belongs to data that
//!   is already in the image when the backup reads it; a write completing
//!   after the swap lands in the fresh bitmap. No write is lost between
//!   two incrementals, without any lock on the write path.
//! - Persistence: [`Cbt::open`] loads `<file>` and immediately rewrites it
//!   with the clean flag cleared; [`Cbt::persist_clean`] (clean shutdown)
//!   writes it with the flag set. Finding the flag cleared at open means the
//!   process died: every bitmap is loaded as *invalid*, and the next backup
//!   must be full. A frozen invalid bitmap says so ([`FrozenBitmap::valid`]).
//!
//! # Threading model
//! The write path (`on_*`) is lock-free: slots are `OnceLock`s and bits are
//! `AtomicU64::fetch_or`. Control operations (add, freeze, persist) take
//! one mutex among themselves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::hook::{WriteData, WriteHook};

/// Named bitmaps per disk.
pub const MAX_BITMAPS: usize = 8;
/// Default tracking granularity.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Name of the bitmap [`Cbt::open`] creates when the file has none.
pub const DEFAULT_BITMAP: &str = "default";
const MAGIC: &[u8; 8] = b"KEELCBT1";

/// Errors of CBT control operations.
#[derive(Debug, thiserror::Error)]
pub enum CbtError {
    /// Granularity not a power of two ≥ 512.
    #[error("Invalid granularity {0}")]
    Granularity(u64),
    /// All bitmap slots are used.
    #[error("Too many bitmaps")]
    TooManyBitmaps,
    /// The name is empty, too long or already used.
    #[error("Invalid or duplicate bitmap name {0:?}")]
    Name(String),
    /// No bitmap with that name.
    #[error("No bitmap named {0:?}")]
    NotFound(String),
    /// Reading the bitmap file failed.
    #[error("Cannot read bitmap file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// Writing the bitmap file failed.
    #[error("Cannot write bitmap file {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

struct Bitmap {
    name: String,
    valid: AtomicBool,
    words: Box<[AtomicU64]>,
}

impl Bitmap {
    fn new(name: &str, nwords: usize, valid: bool) -> Self {
        Self {
            name: name.to_owned(),
            valid: AtomicBool::new(valid),
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Sets bits `first..=last`.
    ///
    /// hot path: no lock; skips the atomic RMW when the bits are already set.
    #[inline]
    fn set_range(&self, first: u64, last: u64) {
        let mut bit = first;
        while bit <= last {
            let w = usize::try_from(bit / 64).unwrap_or(usize::MAX);
            let Some(word) = self.words.get(w) else {
                return;
            };
            let lo = bit % 64;
            let hi = if last / 64 == bit / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::Relaxed);
            }
            bit = (bit / 64 + 1) * 64;
        }
    }
}

/// A bitmap taken out by [`Cbt::freeze_and_reset`]: what changed since the
/// previous freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenBitmap {
    /// Bitmap name.
    pub name: String,
    /// False after a crash: the bits are incomplete, do a full backup.
    pub valid: bool,
    /// Bytes per bit.
    pub granularity: u64,
    /// The bits, granule `i` is bit `i % 64` of word `i / 64`.
    pub words: Vec<u64>,
}

impl FrozenBitmap {
    /// Indices of dirty granules, ascending.
    pub fn dirty_granules(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                out.push(i as u64 * 64 + b);
                w &= w - 1;
            }
        }
        out
    }
}

const FROZEN_MAGIC: &[u8; 8] = b"KEELFRZ1";

impl FrozenBitmap {
    /// Writes the bitmap to `path` (created 0600, replaced atomically), for
    /// handing it between the disk server and the agent.
    pub fn write_file(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = self.name.as_bytes();
        let nlen =
            u8::try_from(name.len()).map_err(|_| std::io::Error::other("bitmap name too long"))?;
        let mut out = Vec::with_capacity(40 + name.len() + self.words.len() * 8);
        out.extend_from_slice(FROZEN_MAGIC);
        out.push(u8::from(self.valid));
        out.extend_from_slice(&self.granularity.to_le_bytes());
        out.push(nlen);
        out.extend_from_slice(name);
        out.extend_from_slice(&(self.words.len() as u64).to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let tmp = path.with_extension("frozen-tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&out)?;
        std::fs::rename(&tmp, path)
    }

    /// Reads a bitmap written by [`FrozenBitmap::write_file`].
    pub fn read_file(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a frozen bitmap");
        let mut r = Reader(&bytes);
        if r.take(8).ok_or_else(bad)? != FROZEN_MAGIC {
            return Err(bad());
        }
        let valid = r.u8().ok_or_else(bad)? == 1;
        let granularity = r.u64().ok_or_else(bad)?;
        let nlen = usize::from(r.u8().ok_or_else(bad)?);
        let name = String::from_utf8(r.take(nlen).ok_or_else(bad)?.to_vec()).map_err(|_| bad())?;
        let nwords = usize::try_from(r.u64().ok_or_else(bad)?).map_err(|_| bad())?;
        if nwords.checked_mul(8) != Some(r.0.len()) {
            return Err(bad());
        }
        let mut words = Vec::with_capacity(nwords);
        for _ in 0..nwords {
            words.push(r.u64().ok_or_else(bad)?);
        }
        Ok(Self {
            name,
            valid,
            granularity,
            words,
        })
    }
}

/// Validity and size of one named bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapStatus {
    /// Name.
    pub name: String,
    /// False after a crash until the next freeze.
    pub valid: bool,
    /// Dirty granules right now.
    pub dirty_granules: u64,
}

/// The changed-block tracker of one disk; use it as the device's
/// [`WriteHook`] (wrapped in an `Arc`).
pub struct Cbt {
    shift: u32,
    granularity: u64,
    disk_size: u64,
    nwords: usize,
    slots: [OnceLock<Bitmap>; MAX_BITMAPS],
    control: Mutex<()>,
    path: Option<PathBuf>,
    /// Whether the file we loaded at open was written by a clean shutdown.
    opened_clean: bool,
}

impl Cbt {
    /// In-memory tracker (no persistence) with no bitmaps.
    pub fn new(disk_size: u64, granularity: u64) -> Result<Self, CbtError> {
        if granularity < 512 || !granularity.is_power_of_two() {
            return Err(CbtError::Granularity(granularity));
        }
        let granules = disk_size.div_ceil(granularity);
        let nwords = usize::try_from(granules.div_ceil(64))
            .map_err(|_| CbtError::Granularity(granularity))?;
        Ok(Self {
            shift: granularity.trailing_zeros(),
            granularity,
            disk_size,
            nwords,
            slots: Default::default(),
            control: Mutex::new(()),
            path: None,
            opened_clean: true,
        })
    }

    /// Tracker persisted in `path`. Loads it when present (bitmaps are
    /// invalid unless the file was written by a clean shutdown, or its
    /// geometry changed), ensures [`DEFAULT_BITMAP`] exists, and marks the
    /// file in use, so a crash from now on is detected at the next open.
    pub fn open(path: &Path, disk_size: u64, granularity: u64) -> Result<Self, CbtError> {
        let mut cbt = Self::new(disk_size, granularity)?;
        cbt.path = Some(path.to_owned());
        match std::fs::read(path) {
            Ok(bytes) => cbt.opened_clean = cbt.load(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CbtError::Read(path.to_owned(), e)),
        }
        if cbt.find(DEFAULT_BITMAP).is_none() {
            // After a crash, even a new bitmap cannot know what changed
            // before it: it starts invalid too.
            cbt.add_with_validity(DEFAULT_BITMAP, cbt.opened_clean)?;
        }
        cbt.write_file(false)?;
        Ok(cbt)
    }

    /// Whether the file found at open was written by a clean shutdown.
    pub fn opened_clean(&self) -> bool {
        self.opened_clean
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Adds a bitmap that tracks from now on (valid).
    pub fn add_bitmap(&self, name: &str) -> Result<(), CbtError> {
        self.add_with_validity(name, true)
    }

    /// Adds a bitmap for a backup chain whose earlier writes were not
    /// tracked (the disk's bitmaps were lost or dropped, e.g. after a
    /// restore in place): invalid, so the chain's next backup reads
    /// everything instead of trusting an empty bitmap.
    pub fn add_untracked_bitmap(&self, name: &str) -> Result<(), CbtError> {
        self.add_with_validity(name, false)
    }

    fn add_with_validity(&self, name: &str, valid: bool) -> Result<(), CbtError> {
        let _g = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() || name.len() > 255 || self.find(name).is_some() {
            return Err(CbtError::Name(name.to_owned()));
        }
        let slot = self
            .slots
            .iter()
            .find(|s| s.get().is_none())
            .ok_or(CbtError::TooManyBitmaps)?;
        slot.set(Bitmap::new(name, self.nwords, valid))
            .map_err(|_| CbtError::TooManyBitmaps)
    }

    fn find(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps().find(|b| b.name == name)
    }

    fn bitmaps(&self) -> impl Iterator<Item = &Bitmap> {
        self.slots.iter().filter_map(OnceLock::get)
    }

    /// Takes the bits of `name` out and clears them, atomically per word
    /// with respect to concurrent writes (see the module docs). The live
    /// bitmap is valid from now on.
    pub fn freeze_and_reset(&self, name: &str) -> Result<FrozenBitmap, CbtError> {
        let _g = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let b = self
            .find(name)
            .ok_or_else(|| CbtError::NotFound(name.to_owned()))?;
        let valid = b.valid.swap(true, Ordering::AcqRel);
        let words = b
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        Ok(FrozenBitmap {
            name: name.to_owned(),
            valid,
            granularity: self.granularity,
            words,
        })
    }

    /// Undoes a [`Cbt::freeze_and_reset`] whose backup failed: ORs the
    /// frozen bits back into the live bitmap (which kept tracking since the
    /// freeze), so the next backup copies them again. A frozen invalid
    /// bitmap makes the live one invalid again. Bits past the disk end and
    /// a granularity mismatch are rejected rather than guessed.
    pub fn merge_back(&self, frozen: &FrozenBitmap) -> Result<(), CbtError> {
        let _g = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let b = self
            .find(&frozen.name)
            .ok_or_else(|| CbtError::NotFound(frozen.name.clone()))?;
        if frozen.granularity != self.granularity {
            return Err(CbtError::Granularity(frozen.granularity));
        }
        for (dst, &src) in b.words.iter().zip(&frozen.words) {
            if src != 0 {
                dst.fetch_or(src, Ordering::AcqRel);
            }
        }
        if !frozen.valid {
            b.valid.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// A copy of `name` without clearing it.
    pub fn peek(&self, name: &str) -> Result<FrozenBitmap, CbtError> {
        let b = self
            .find(name)
            .ok_or_else(|| CbtError::NotFound(name.to_owned()))?;
        Ok(FrozenBitmap {
            name: name.to_owned(),
            valid: b.valid.load(Ordering::Acquire),
            granularity: self.granularity,
            words: b.words.iter().map(|w| w.load(Ordering::Acquire)).collect(),
        })
    }

    /// State of every bitmap (for the API / metrics).
    pub fn status(&self) -> Vec<BitmapStatus> {
        self.bitmaps()
            .map(|b| BitmapStatus {
                name: b.name.clone(),
                valid: b.valid.load(Ordering::Acquire),
                dirty_granules: b
                    .words
                    .iter()
                    .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                    .sum(),
            })
            .collect()
    }

    /// Writes the file with the clean flag set. Call after the device
    /// stopped (no more writes); a write after this is still tracked in
    /// memory but would be lost on a crash, which the next `open` detects
    /// only if something marks the file in use again.
    pub fn persist_clean(&self) -> Result<(), CbtError> {
        self.write_file(true)
    }

    /// hot path: marks `offset..offset+len` in every bitmap.
    #[inline]
    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.shift;
        let last = offset.saturating_add(len - 1) >> self.shift;
        for b in self.bitmaps() {
            b.set_range(first, last);
        }
    }

    /// Parses a file image; returns whether it was clean. Bitmaps are
    /// loaded as invalid when not clean or when the geometry differs.
    fn load(&mut self, bytes: &[u8]) -> bool {
        let mut r = Reader(bytes);
        let parsed = (|| {
            if r.take(8)? != MAGIC {
                return None;
            }
            let clean = r.u8()? == 1;
            let gran = r.u64()?;
            let size = r.u64()?;
            let count = r.u8()?;
            let same_geometry = gran == self.granularity && size == self.disk_size;
            let mut maps = Vec::new();
            for _ in 0..count {
                let nlen = usize::from(r.u8()?);
                let name = String::from_utf8(r.take(nlen)?.to_vec()).ok()?;
                let valid = r.u8()? == 1;
                let nwords = usize::try_from(r.u64()?).ok()?;
                let mut words = Vec::with_capacity(nwords.min(self.nwords));
                for _ in 0..nwords {
                    words.push(r.u64()?);
                }
                maps.push((name, valid, words));
            }
            Some((clean && same_geometry, maps))
        })();
        let Some((clean, maps)) = parsed else {
            return false; // unreadable: start over, invalid
        };
        for (i, (name, valid, words)) in maps.into_iter().enumerate().take(MAX_BITMAPS) {
            let keep = clean && words.len() == self.nwords;
            let b = Bitmap::new(&name, self.nwords, keep && valid);
            if keep {
                for (dst, src) in b.words.iter().zip(words) {
                    dst.store(src, Ordering::Relaxed);
                }
            }
            let _ = self.slots[i].set(b);
        }
        clean
    }

    fn write_file(&self, clean: bool) -> Result<(), CbtError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _g = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(64 + self.nwords * 8 * MAX_BITMAPS);
        out.extend_from_slice(MAGIC);
        out.push(u8::from(clean));
        out.extend_from_slice(&self.granularity.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        let maps: Vec<&Bitmap> = self.bitmaps().collect();
        out.push(u8::try_from(maps.len()).unwrap_or(u8::MAX));
        for b in maps {
            out.push(u8::try_from(b.name.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(b.name.as_bytes());
            out.push(u8::from(b.valid.load(Ordering::Acquire)));
            out.extend_from_slice(&(b.words.len() as u64).to_le_bytes());
            for w in b.words.iter() {
                out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
            }
        }
        let err = |e| CbtError::Write(path.clone(), e);
        let tmp = path.with_extension("cbt-tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&out).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
}

impl WriteHook for Cbt {
    #[inline]
    fn on_write(&self, offset: u64, len: u64, _data: &WriteData<'_>) {
        self.mark(offset, len);
    }
    #[inline]
    fn on_discard(&self, offset: u64, len: u64) {
        self.mark(offset, len);
    }
    #[inline]
    fn on_write_zeroes(&self, offset: u64, len: u64) {
        self.mark(offset, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const SIZE: u64 = 64 << 20;

    fn write(cbt: &Cbt, off: u64, len: u64) {
        cbt.on_write(off, len, &WriteData::new(&[]));
    }

    #[test]
    fn frozen_bitmap_file_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let cbt = Cbt::new(SIZE, DEFAULT_GRANULARITY).unwrap();
        cbt.add_bitmap("chain").unwrap();
        write(&cbt, 0, 1);
        write(&cbt, SIZE - 1, 1);
        let f = cbt.freeze_and_reset("chain").unwrap();
        let path = dir.path().join("f");
        f.write_file(&path).unwrap();
        assert_eq!(FrozenBitmap::read_file(&path).unwrap(), f);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 8, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(FrozenBitmap::read_file(&path).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&path, longer).unwrap();
        assert!(FrozenBitmap::read_file(&path).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The bitmap is exactly the set of granules a random workload touched.
        #[test]
        fn bitmap_equals_written_granules(
            gran_shift in 9u32..21,
            ops in proptest::collection::vec((0u64..SIZE / 512, 1u64..2048, 0u8..3), 0..200),
        ) {
            let gran = 1u64 << gran_shift;
            let cbt = Cbt::new(SIZE, gran).unwrap();
            cbt.add_bitmap("a").unwrap();
            let mut expected = BTreeSet::new();
            for (sector, sectors, kind) in ops {
                let off = sector * 512;
                let len = (sectors * 512).min(SIZE - off);
                match kind {
                    0 => write(&cbt, off, len),
                    1 => cbt.on_discard(off, len),
                    _ => cbt.on_write_zeroes(off, len),
                }
                for g in off / gran..=(off + len - 1) / gran {
                    expected.insert(g);
                }
            }
            let got: BTreeSet<u64> = cbt.peek("a").unwrap().dirty_granules().into_iter().collect();
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn freeze_and_reset_splits_epochs() {
        let cbt = Cbt::new(SIZE, DEFAULT_GRANULARITY).unwrap();
        cbt.add_bitmap("nightly").unwrap();
        cbt.add_bitmap("hourly").unwrap();
        write(&cbt, 0, 4096);
        write(&cbt, 10 << 20, 200 << 10); // 10 MiB .. 10.2 MiB: granules 160..=163
        let f = cbt.freeze_and_reset("hourly").unwrap();
        assert!(f.valid);
        assert_eq!(f.dirty_granules(), vec![0, 160, 161, 162, 163]);
        write(&cbt, 65536, 1);
        assert_eq!(
            cbt.freeze_and_reset("hourly").unwrap().dirty_granules(),
            vec![1]
        );
        // the other bitmap kept everything
        assert_eq!(
            cbt.peek("nightly").unwrap().dirty_granules(),
            vec![0, 1, 160, 161, 162, 163]
        );
        assert!(matches!(
            cbt.freeze_and_reset("nope"),
            Err(CbtError::NotFound(_))
        ));
        assert!(matches!(cbt.add_bitmap("hourly"), Err(CbtError::Name(_))));
        assert!(matches!(
            Cbt::new(SIZE, 1000),
            Err(CbtError::Granularity(1000))
        ));
    }

    #[test]
    fn an_untracked_bitmap_is_invalid_until_its_first_freeze() {
        let cbt = Cbt::new(SIZE, DEFAULT_GRANULARITY).unwrap();
        cbt.add_untracked_bitmap("chain").unwrap();
        write(&cbt, 0, 1);
        let first = cbt.freeze_and_reset("chain").unwrap();
        assert!(!first.valid, "writes before it were not tracked");
        write(&cbt, 1 << 16, 1);
        let second = cbt.freeze_and_reset("chain").unwrap();
        assert!(second.valid);
        assert_eq!(second.dirty_granules(), vec![1]);
    }

    #[test]
    fn merge_back_restores_a_failed_freeze() {
        let cbt = Cbt::new(SIZE, DEFAULT_GRANULARITY).unwrap();
        cbt.add_bitmap("b").unwrap();
        write(&cbt, 0, 1);
        let f = cbt.freeze_and_reset("b").unwrap();
        write(&cbt, 2 << 16, 1); // lands in the live bitmap meanwhile
        cbt.merge_back(&f).unwrap();
        let now = cbt.peek("b").unwrap();
        assert!(now.valid);
        assert_eq!(now.dirty_granules(), vec![0, 2]);
        let mut invalid = cbt.freeze_and_reset("b").unwrap();
        invalid.valid = false;
        cbt.merge_back(&invalid).unwrap();
        assert!(!cbt.peek("b").unwrap().valid, "invalid stays invalid");
    }

    #[test]
    fn concurrent_writes_during_freeze_are_never_lost() {
        let cbt = std::sync::Arc::new(Cbt::new(SIZE, 4096).unwrap());
        cbt.add_bitmap("b").unwrap();
        let writer = {
            let cbt = cbt.clone();
            std::thread::spawn(move || {
                for g in 0..(SIZE / 4096) {
                    write(&cbt, g * 4096, 4096);
                }
            })
        };
        let mut seen = BTreeSet::new();
        while !writer.is_finished() {
            seen.extend(cbt.freeze_and_reset("b").unwrap().dirty_granules());
        }
        writer.join().unwrap();
        seen.extend(cbt.freeze_and_reset("b").unwrap().dirty_granules());
        assert_eq!(
            seen.len() as u64,
            SIZE / 4096,
            "every granule in some epoch"
        );
    }

    #[test]
    fn clean_shutdown_persists_and_crash_invalidates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.cbt");
        {
            let cbt = Cbt::open(&path, SIZE, DEFAULT_GRANULARITY).unwrap();
            assert!(cbt.peek(DEFAULT_BITMAP).unwrap().valid);
            write(&cbt, 3 << 16, 10);
            cbt.persist_clean().unwrap();
        }
        {
            let cbt = Cbt::open(&path, SIZE, DEFAULT_GRANULARITY).unwrap();
            assert!(cbt.opened_clean());
            let f = cbt.peek(DEFAULT_BITMAP).unwrap();
            assert!(f.valid);
            assert_eq!(f.dirty_granules(), vec![3]);
            write(&cbt, 5 << 16, 10);
            // no persist_clean: the process "crashes" here
        }
        let cbt = Cbt::open(&path, SIZE, DEFAULT_GRANULARITY).unwrap();
        assert!(!cbt.opened_clean());
        let f = cbt.freeze_and_reset(DEFAULT_BITMAP).unwrap();
        assert!(!f.valid, "after a crash the bitmap is known-invalid");
        assert!(
            cbt.peek(DEFAULT_BITMAP).unwrap().valid,
            "next epoch is valid"
        );
        // a changed geometry invalidates too
        cbt.persist_clean().unwrap();
        drop(cbt);
        let cbt = Cbt::open(&path, SIZE * 2, DEFAULT_GRANULARITY).unwrap();
        assert!(!cbt.peek(DEFAULT_BITMAP).unwrap().valid);
        // garbage file: invalid, not an error
        std::fs::write(&path, b"garbage").unwrap();
        let cbt = Cbt::open(&path, SIZE, DEFAULT_GRANULARITY).unwrap();
        assert!(!cbt.peek(DEFAULT_BITMAP).unwrap().valid);
    }
}
