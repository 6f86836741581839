//! The writer thread: appends full buffers to the open segment file and
//! seals segments; and [`recover`], run once at start.
//!
//! Files in the cache directory:
//! - `seg-<seq>.open`: the segment being written (never shipped);
//! - `seg-<seq>.seg`: sealed (trailer written, fsynced, renamed);
//! - `chain`: sequence number and checksum of the last sealed segment
//!   (segments are deleted once the replica has them, the chain goes on);
//! - `CLEAN`: written by a clean shutdown, removed at start.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::{self, encode_trailer, SegmentHeader};
use super::{now_ms, segment_path, Journal, JournalError, ToWriter};

/// Marks a journal shut down cleanly (nothing dirty, nothing in resync).
pub(crate) const CLEAN_FILE: &str = "CLEAN";

/// Errors of the writer thread (the group then stops journaling: writes
/// go on, the next start does a full resync).
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// Creating or writing the open segment failed.
    #[error("Cannot write segment {0}")]
    WriteSegment(PathBuf, #[source] std::io::Error),
    /// Sealing (fsync, rename, chain file) failed.
    #[error("Cannot seal segment {0}")]
    Seal(PathBuf, #[source] std::io::Error),
}

/// Last sealed segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chain {
    /// Its sequence number (0: none yet).
    pub seq: u64,
    /// Its segment checksum.
    pub checksum: u32,
}

/// What [`recover`] found.
#[derive(Debug)]
pub struct Recovered {
    /// Continue the chain from here.
    pub chain: Chain,
    /// Bytes of valid sealed segments still to ship.
    pub cache_bytes: u64,
    /// Whether the previous run shut down cleanly.
    pub clean: bool,
    /// Unsealed or invalid files dropped.
    pub dropped: Vec<PathBuf>,
}

/// Recovers a cache directory: drops `.open` segments (an unsealed tail
/// is never shipped; its valid records are counted for the log), verifies
/// every sealed segment and drops an invalid one with everything after
/// it, and reads the chain. Consumes the [`CLEAN_FILE`] marker.
pub fn recover(dir: &Path) -> Result<Recovered, JournalError> {
    let derr = |e| JournalError::Dir(dir.to_owned(), e);
    let mut chain = read_chain(dir).unwrap_or_default();
    let mut sealed = Vec::new();
    let mut dropped = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(derr)? {
        let path = entry.map_err(derr)?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let seq = name
            .strip_prefix("seg-")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<u64>().ok());
        match (seq, path.extension().and_then(|e| e.to_str())) {
            (Some(_), Some("open")) => {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let valid = SegmentHeader::decode(&bytes).map_or(0, |(_, hlen)| {
                    format::records(&bytes[hlen..])
                        .take_while(Result::is_ok)
                        .count()
                });
                tracing::warn!(path = %path.display(), valid_records = valid, bytes = bytes.len(),
                    "dropping unsealed journal tail (never shipped)");
                std::fs::remove_file(&path).map_err(derr)?;
                dropped.push(path);
            }
            (Some(seq), Some("seg")) => sealed.push((seq, path)),
            _ => {}
        }
    }
    sealed.sort();
    let mut cache_bytes = 0;
    let mut broken = false;
    for (seq, path) in sealed {
        let bytes = std::fs::read(&path).map_err(derr)?;
        let ok = !broken
            && match format::Segment::verify(&bytes) {
                Ok(s) if s.header.seq == seq => {
                    if seq > chain.seq {
                        chain = Chain {
                            seq,
                            checksum: s.trailer.checksum,
                        };
                    }
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "dropping corrupt sealed segment and all later ones");
                    false
                }
            };
        if ok {
            cache_bytes += bytes.len() as u64;
        } else {
            broken = true;
            std::fs::remove_file(&path).map_err(derr)?;
            dropped.push(path);
        }
    }
    let clean_path = dir.join(CLEAN_FILE);
    let clean = clean_path.exists() && !broken && dropped.is_empty();
    if clean_path.exists() {
        std::fs::remove_file(&clean_path).map_err(derr)?;
        sync_dir(dir).map_err(derr)?;
    }
    Ok(Recovered {
        chain,
        cache_bytes,
        clean,
        dropped,
    })
}

fn read_chain(dir: &Path) -> Option<Chain> {
    let s = std::fs::read_to_string(dir.join("chain")).ok()?;
    let mut it = s.split_whitespace();
    Some(Chain {
        seq: it.next()?.parse().ok()?,
        checksum: it.next()?.parse().ok()?,
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        sync_dir(d)?;
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being written.
struct OpenSegment {
    path: PathBuf,
    file: File,
    crc: u32,
    len: u64,
    records: u64,
}

/// See the module docs.
pub struct Writer {
    journal: Arc<Journal>,
    full_rx: Receiver<ToWriter>,
    chain: Chain,
    open: Option<OpenSegment>,
    last_seal: Instant,
}

/// How often the writer checks for a stop request.
const STOP_POLL: Duration = Duration::from_millis(100);

impl Writer {
    pub(crate) fn new(journal: Arc<Journal>, full_rx: Receiver<ToWriter>, chain: Chain) -> Self {
        Self {
            journal,
            full_rx,
            chain,
            open: None,
            last_seal: Instant::now(),
        }
    }

    /// Runs until the journal is stopped; then seals and marks it clean
    /// (when nothing is left dirty).
    pub fn run(mut self) -> Result<(), WriterError> {
        let r = self.run_inner();
        if let Err(e) = &r {
            tracing::error!(error = %e, "journal writer failed: replication stopped until restart");
        }
        r
    }

    fn run_inner(&mut self) -> Result<(), WriterError> {
        let rpo = self.journal.config.rpo;
        loop {
            if self.journal.stop.load(Ordering::Acquire) {
                self.seal_period()?;
                // The hold first: a digest pass takes dirty bits out while
                // it compares, and releases the hold only once settled.
                if !self.journal.resync_held()
                    && self.journal.dirty_chunks() == 0
                    && !self.journal.resyncing()
                {
                    let p = self.journal.config.dir.join(CLEAN_FILE);
                    write_atomic(&p, b"clean\n").map_err(|e| WriterError::Seal(p, e))?;
                }
                return Ok(());
            }
            let wait = rpo.saturating_sub(self.last_seal.elapsed()).min(STOP_POLL);
            if self.journal.is_sync() {
                // Group commit: cut as soon as records wait; what arrives
                // while this seal runs goes into the next one.
                while let Ok(m) = self.full_rx.try_recv() {
                    self.take(m)?;
                }
                if self.journal.wait_uncut(wait) || self.last_seal.elapsed() >= rpo {
                    self.seal_period()?;
                }
                continue;
            }
            match self.full_rx.recv_timeout(wait) {
                Ok(m) => self.take(m)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if self.last_seal.elapsed() >= rpo {
                self.seal_period()?;
            }
        }
    }

    /// Writes one message: a full buffer (sealing at the size limit; the
    /// end of a buffer is a record boundary) or a cut (sealing).
    fn take(&mut self, m: ToWriter) -> Result<(), WriterError> {
        match m {
            ToWriter::Full(buf) => {
                self.write_buffer(&buf)?;
                self.journal.recycle(buf);
                let full = self
                    .open
                    .as_ref()
                    .is_some_and(|o| o.len >= self.journal.config.max_segment_bytes);
                if full {
                    self.seal(None)?;
                }
                Ok(())
            }
            ToWriter::Cut { buf, ticket } => {
                self.write_buffer(&buf)?;
                if buf.capacity() > 0 {
                    self.journal.recycle(buf);
                }
                self.seal(Some(ticket))
            }
        }
    }

    /// Period seal: everything journaled until now. The cut goes into the
    /// channel behind the full buffers queued before it, so the segment
    /// ends exactly there, with every record in journal order.
    fn seal_period(&mut self) -> Result<(), WriterError> {
        if !self.journal.cut() {
            return self.seal(None);
        }
        loop {
            match self.full_rx.recv() {
                Ok(m @ ToWriter::Full(_)) => self.take(m)?,
                Ok(m @ ToWriter::Cut { .. }) => return self.take(m),
                Err(_) => return self.seal(None),
            }
        }
    }

    fn write_buffer(&mut self, buf: &[u8]) -> Result<(), WriterError> {
        if self.open.is_none() {
            let seq = self.chain.seq + 1;
            let path = self.journal.config.dir.join(format!("seg-{seq:016}.open"));
            let header = SegmentHeader {
                group_id: self.journal.config.group_id,
                site_id: self.journal.config.site_id,
                seq,
                prev_checksum: self.chain.checksum,
                flags: 0,
                disks: self.journal.disks.clone(),
            }
            .encode();
            let werr = |e| WriterError::WriteSegment(path.clone(), e);
            let mut file = File::create(&path).map_err(werr)?;
            file.write_all(&header).map_err(werr)?;
            self.add_cache(header.len() as u64);
            self.open = Some(OpenSegment {
                crc: crc32c::crc32c(&header),
                len: header.len() as u64,
                path,
                file,
                records: 0,
            });
        }
        let Some(o) = self.open.as_mut() else {
            return Ok(());
        };
        if buf.is_empty() {
            return Ok(());
        }
        o.file
            .write_all(buf)
            .map_err(|e| WriterError::WriteSegment(o.path.clone(), e))?;
        o.crc = crc32c::crc32c_append(o.crc, buf);
        o.len += buf.len() as u64;
        o.records += format::records(buf).take_while(Result::is_ok).count() as u64;
        let n = buf.len() as u64;
        self.add_cache(n);
        Ok(())
    }

    fn add_cache(&self, n: u64) {
        self.journal.cache_used.fetch_add(n, Ordering::AcqRel);
    }

    /// Writes the trailer, fsyncs, renames to `.seg`, records the chain.
    /// An empty period still seals a (header-only) segment: it is the
    /// heartbeat the replica measures its lag with.
    fn seal(&mut self, ticket: Option<u64>) -> Result<(), WriterError> {
        self.last_seal = Instant::now();
        if self.open.is_none() {
            self.write_buffer(&[])?;
        }
        let Some(mut o) = self.open.take() else {
            return Ok(());
        };
        let seq = self.chain.seq + 1;
        let trailer = encode_trailer(o.crc, o.len, o.records, now_ms());
        let serr = |e| WriterError::Seal(o.path.clone(), e);
        o.file.write_all(&trailer).map_err(serr)?;
        o.file.sync_all().map_err(serr)?;
        self.add_cache(trailer.len() as u64);
        let sealed = segment_path(&self.journal.config.dir, seq);
        std::fs::rename(&o.path, &sealed).map_err(serr)?;
        let checksum = crc32c::crc32c_append(o.crc, &trailer[..trailer.len() - 4]);
        self.chain = Chain { seq, checksum };
        let chain = self.journal.config.dir.join("chain");
        write_atomic(&chain, format!("{seq} {checksum}\n").as_bytes())
            .map_err(|e| WriterError::Seal(chain.clone(), e))?;
        let c = &self.journal.counters;
        c.segments_sealed.fetch_add(1, Ordering::Relaxed);
        c.last_sealed_seq.store(seq, Ordering::Release);
        self.journal.note_sealed(seq, ticket);
        tracing::debug!(seq, bytes = o.len, records = o.records, "segment sealed");
        Ok(())
    }
}
