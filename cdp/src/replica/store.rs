//! The replica's directory: raw replica disks, the applied state, and one
//! undo log per applied segment (the recovery points).
//!
//! Applying segment `k` (only whole, verified segments, strictly in order,
//! from the received bytes in memory):
//! 1. the old content of every range it touches is saved to `undo-<k>` and
//!    fsynced (checksummed, so a torn undo log is recognised);
//! 2. the records are applied in order to `disk-<id>.raw`, which are
//!    fsynced;
//! 3. `state.json` is replaced atomically with `last_seq = k`;
//! 4. only then is the segment acknowledged.
//!
//! The segment itself is not stored: until the acknowledgement the source
//! keeps it and sends it again after a crash. (Earlier versions wrote it
//! to `incoming-<k>.seg` first, a copy nothing read; stale ones are
//! removed at open.)
//!
//! A crash between 1 and 3 leaves `undo-<last+1>`: [`Replica::open`] rolls
//! it back, so the disks are always at the end of a whole segment. Undo
//! logs of the last `keep` segments are kept: rolling back through them
//! reaches any of those recovery points ([`Replica::promote`]).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::journal::format::{DiskEntry, Record, RecordKind, Segment};

const UNDO_MAGIC: &[u8; 8] = b"KEELUND1";
/// How far a segment's cut time may be ahead of this host's clock, or
/// behind the segment before it.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Zero-fill / copy granularity.
const IO_CHUNK: usize = 1 << 20;

/// Why a received segment was refused (nothing of it was applied).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The bytes are not a valid sealed segment.
    #[error("Invalid segment")]
    Invalid(#[source] crate::journal::format::FormatError),
    /// Another consistency group.
    #[error("Segment of group {got}, replica of group {want}")]
    WrongGroup {
        /// Received.
        got: u64,
        /// Configured.
        want: u64,
    },
    /// Another source site.
    #[error("Segment from site {got}, replica of site {want}")]
    WrongSite {
        /// Received.
        got: u64,
        /// Configured.
        want: u64,
    },
    /// Already applied (a replay).
    #[error("Replay of segment {seq} (last applied {last})")]
    Replay {
        /// Received.
        seq: u64,
        /// Last applied.
        last: u64,
    },
    /// Would skip segments.
    #[error("Segment {seq} out of order (last applied {last})")]
    Gap {
        /// Received.
        seq: u64,
        /// Last applied.
        last: u64,
    },
    /// Its previous-checksum does not match the last applied segment.
    #[error("Segment {0} does not chain onto the last applied segment")]
    Chain(u64),
    /// Its disk table differs from the replica's disks.
    #[error("Segment disk table differs from the replica disks")]
    Disks,
    /// The replica was promoted: it takes no more segments.
    #[error("Replica promoted")]
    Promoted,
    /// The segment was cut at a time far ahead of this host's clock.
    #[error("Segment cut {ahead_ms} ms in the future of this host's clock: clocks skewed")]
    ClockAhead {
        /// How far ahead.
        ahead_ms: u64,
    },
    /// The segment was cut long before the segment it follows.
    #[error(
        "Segment cut {back_ms} ms before the segment it follows: the source's clock went back"
    )]
    ClockBack {
        /// How far back.
        back_ms: u64,
    },
}

/// Errors of the replica store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A segment was refused.
    #[error("Segment refused")]
    Refused(#[from] Refusal),
    /// Reading or writing a replica file failed.
    #[error("Cannot access {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The state file is unreadable.
    #[error("Corrupt replica state {0}")]
    State(PathBuf, #[source] serde_json::Error),
    /// No such recovery point.
    #[error("No consistent recovery point {0}")]
    NoSuchPoint(u64),
    /// The replica is in the middle of a resync and holds no consistent
    /// point to roll back to.
    #[error("No consistent recovery point is available")]
    NoConsistentPoint,
}

/// One applied segment, newest last.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointInfo {
    /// Segment sequence number.
    pub seq: u64,
    /// Its segment checksum.
    pub checksum: u32,
    /// When the source cut it (ms since the epoch, source clock).
    pub cut_ms: u64,
    /// Whether the disks are crash-consistent after it (no resync open).
    pub consistent: bool,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ReplicaState {
    /// Consistency group.
    pub group_id: u64,
    /// Source site.
    pub source_site: u64,
    /// Disk table (empty until the first segment).
    pub disks: Vec<(u16, u64)>,
    /// Last applied segment (0: none).
    pub last_seq: u64,
    /// Its checksum.
    pub last_checksum: u32,
    /// A resync is open at the last applied segment.
    pub in_resync: bool,
    /// Applied segments with undo logs still kept, plus the last one.
    pub history: Vec<PointInfo>,
    /// Set by promote: no more segments.
    pub promoted: bool,
}

/// The replica directory.
pub struct Replica {
    dir: PathBuf,
    keep: usize,
    state: ReplicaState,
}

fn ioe(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(path.to_owned(), e)
}

impl Replica {
    /// Opens (or creates) the replica of `group_id` from `source_site` in
    /// `dir`, keeping undo logs of the last `keep` segments; rolls back a
    /// segment whose apply was interrupted.
    pub fn open(
        dir: &Path,
        group_id: u64,
        source_site: u64,
        keep: usize,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(ioe(dir))?;
        let sp = dir.join("state.json");
        let state = match std::fs::read(&sp) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::State(sp.clone(), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReplicaState {
                group_id,
                source_site,
                ..Default::default()
            },
            Err(e) => return Err(StoreError::Io(sp, e)),
        };
        let r = Self {
            dir: dir.to_owned(),
            keep,
            state,
        };
        let pending = r.undo_path(r.state.last_seq + 1);
        if pending.exists() {
            match r.apply_undo(&pending) {
                Ok(()) => tracing::warn!(
                    seq = r.state.last_seq + 1,
                    "rolled back an interrupted apply"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "interrupted before apply started (torn undo log)")
                }
            }
            std::fs::remove_file(&pending).map_err(ioe(&pending))?;
        }
        for e in std::fs::read_dir(dir).map_err(ioe(dir))?.flatten() {
            if e.file_name().to_string_lossy().starts_with("incoming-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(r)
    }

    /// Opens an existing replica without knowing its ids (promote, status).
    pub fn open_existing(dir: &Path) -> Result<Self, StoreError> {
        let sp = dir.join("state.json");
        let b = std::fs::read(&sp).map_err(ioe(&sp))?;
        let st: ReplicaState = serde_json::from_slice(&b).map_err(|e| StoreError::State(sp, e))?;
        Self::open(dir, st.group_id, st.source_site, usize::MAX)
    }

    /// The applied state.
    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    /// Path of replica disk `id`.
    pub fn disk_path(&self, id: u16) -> PathBuf {
        self.dir.join(format!("disk-{id}.raw"))
    }

    fn undo_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("undo-{seq:016}"))
    }

    /// Consistent recovery points, oldest first.
    pub fn points(&self) -> Vec<PointInfo> {
        self.state
            .history
            .iter()
            .filter(|p| p.consistent)
            .cloned()
            .collect()
    }

    /// Checks a received segment against the chain without applying it.
    pub fn check<'a>(&self, bytes: &'a [u8]) -> Result<Segment<'a>, Refusal> {
        if self.state.promoted {
            return Err(Refusal::Promoted);
        }
        let seg = Segment::verify(bytes).map_err(Refusal::Invalid)?;
        let (h, st) = (&seg.header, &self.state);
        if h.group_id != st.group_id {
            return Err(Refusal::WrongGroup {
                got: h.group_id,
                want: st.group_id,
            });
        }
        if h.site_id != st.source_site {
            return Err(Refusal::WrongSite {
                got: h.site_id,
                want: st.source_site,
            });
        }
        if h.seq <= st.last_seq {
            return Err(Refusal::Replay {
                seq: h.seq,
                last: st.last_seq,
            });
        }
        if h.seq != st.last_seq + 1 {
            return Err(Refusal::Gap {
                seq: h.seq,
                last: st.last_seq,
            });
        }
        if h.prev_checksum != st.last_checksum {
            return Err(Refusal::Chain(h.seq));
        }
        // Cut times order the recovery points and give the lag: a source
        // clock far off would make both lie. Refused, not applied; the
        // source retries, and the same segment passes once the clocks agree.
        let cut = seg.trailer.cut_ms;
        let now = crate::journal::now_ms();
        if cut > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Refusal::ClockAhead {
                ahead_ms: cut - now,
            });
        }
        if let Some(last) = st.history.last() {
            if last.cut_ms > cut.saturating_add(MAX_CLOCK_SKEW_MS) {
                return Err(Refusal::ClockBack {
                    back_ms: last.cut_ms - cut,
                });
            }
        }
        let table: Vec<(u16, u64)> = h.disks.iter().map(|d| (d.id, d.size)).collect();
        if !st.disks.is_empty() && st.disks != table {
            return Err(Refusal::Disks);
        }
        Ok(seg)
    }

    /// Verifies, stores and applies one received segment (see the module
    /// docs); returns its sequence number.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<u64, StoreError> {
        let seg = self.check(bytes)?;
        let seq = seg.header.seq;
        if self.state.disks.is_empty() {
            self.create_disks(&seg.header.disks)?;
        }
        let mut disks = self.open_disks()?;
        let undo = self.undo_path(seq);
        self.write_undo(&undo, seq, &seg, &mut disks)?;
        let mut in_resync = self.state.in_resync;
        for rec in seg.records() {
            apply_record(&rec, &mut disks, &mut in_resync).map_err(ioe(&self.dir))?;
        }
        for (_, f, p) in &disks {
            f.sync_data().map_err(ioe(p))?;
        }
        let st = &mut self.state;
        st.last_seq = seq;
        st.last_checksum = seg.trailer.checksum;
        st.in_resync = in_resync;
        st.history.push(PointInfo {
            seq,
            checksum: seg.trailer.checksum,
            cut_ms: seg.trailer.cut_ms,
            consistent: !in_resync,
        });
        let drop_before = st.history.len().saturating_sub(self.keep + 1);
        let old: Vec<u64> = st.history.drain(..drop_before).map(|p| p.seq).collect();
        self.save()?;
        for s in old {
            let _ = std::fs::remove_file(self.undo_path(s));
        }
        Ok(seq)
    }

    fn create_disks(&mut self, disks: &[DiskEntry]) -> Result<(), StoreError> {
        for d in disks {
            let p = self.disk_path(d.id);
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(ioe(&p))?;
            f.set_len(d.size).map_err(ioe(&p))?;
            f.sync_all().map_err(ioe(&p))?;
        }
        self.state.disks = disks.iter().map(|d| (d.id, d.size)).collect();
        self.save()
    }

    fn open_disks(&self) -> Result<Vec<(u16, File, PathBuf)>, StoreError> {
        self.state
            .disks
            .iter()
            .map(|&(id, _)| {
                let p = self.disk_path(id);
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .map_err(ioe(&p))?;
                Ok((id, f, p))
            })
            .collect()
    }

    /// Saves the old content of every range `seg` touches.
    fn write_undo(
        &self,
        path: &Path,
        seq: u64,
        seg: &Segment<'_>,
        disks: &mut [(u16, File, PathBuf)],
    ) -> Result<(), StoreError> {
        let f = File::create(path).map_err(ioe(path))?;
        let mut w = CrcWriter {
            w: BufWriter::with_capacity(IO_CHUNK, f),
            crc: 0,
        };
        let e = ioe(path);
        let body = || -> std::io::Result<()> {
            w.put(UNDO_MAGIC)?;
            w.put(&seq.to_le_bytes())?;
            let mut buf = vec![0u8; IO_CHUNK];
            // A range written again later in the segment: its old content
            // is already saved (every entry holds pre-segment content).
            let mut saved = std::collections::HashSet::new();
            for rec in seg.records() {
                let Some((_, file, _)) = disks.iter().find(|d| d.0 == rec.disk) else {
                    continue;
                };
                if !touches_data(rec.kind) || !saved.insert((rec.disk, rec.offset, rec.len)) {
                    continue;
                }
                w.put(&rec.disk.to_le_bytes())?;
                w.put(&rec.offset.to_le_bytes())?;
                w.put(&rec.len.to_le_bytes())?;
                let mut done = 0u64;
                while done < rec.len {
                    let n =
                        usize::try_from((rec.len - done).min(IO_CHUNK as u64)).unwrap_or(IO_CHUNK);
                    file.read_exact_at(&mut buf[..n], rec.offset + done)?;
                    w.put(&buf[..n])?;
                    done += n as u64;
                }
            }
            let crc = w.crc;
            w.w.write_all(&crc.to_le_bytes())?;
            let f = w.w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()
        };
        body().map_err(e)?;
        crate::journal::writer::sync_dir(&self.dir).map_err(ioe(&self.dir))
    }

    /// Writes the old content saved in an undo log back (checked first).
    fn apply_undo(&self, path: &Path) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(ioe(path))?;
        let torn = || StoreError::Io(path.to_owned(), std::io::Error::other("torn undo log"));
        if bytes.len() < 20 || &bytes[..8] != UNDO_MAGIC {
            return Err(torn());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(torn());
        }
        let disks = self.open_disks()?;
        let mut at = 16;
        // Every entry was read before the segment was applied, so they all
        // hold pre-segment content; newest first anyway.
        let mut entries = Vec::new();
        while at + 18 <= body.len() {
            let disk = u16::from_le_bytes([body[at], body[at + 1]]);
            let mut o = [0u8; 8];
            o.copy_from_slice(&body[at + 2..at + 10]);
            let mut l = [0u8; 8];
            l.copy_from_slice(&body[at + 10..at + 18]);
            let (offset, len) = (u64::from_le_bytes(o), u64::from_le_bytes(l));
            let start = at + 18;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|&e| e <= body.len())
                .ok_or_else(torn)?;
            entries.push((disk, offset, start, end));
            at = end;
        }
        for &(disk, offset, start, end) in entries.iter().rev() {
            if let Some((_, f, p)) = disks.iter().find(|d| d.0 == disk) {
                f.write_all_at(&body[start..end], offset).map_err(ioe(p))?;
            }
        }
        for (_, f, p) in &disks {
            f.sync_data().map_err(ioe(p))?;
        }
        Ok(())
    }

    /// Stops the replica for good at a recovery point: `to` (a consistent
    /// point still held), or by default the latest consistent one. Rolls
    /// the disks back through the undo logs; they are then plain raw
    /// images a VM can boot from.
    pub fn promote(&mut self, to: Option<u64>) -> Result<u64, StoreError> {
        let target = match to {
            Some(seq) => self
                .points()
                .iter()
                .find(|p| p.seq == seq)
                .map(|p| p.seq)
                .ok_or(StoreError::NoSuchPoint(seq))?,
            None => {
                if self.state.last_seq == 0 || self.state.history.is_empty() {
                    self.state.promoted = true;
                    self.save()?;
                    return Ok(self.state.last_seq);
                }
                self.points()
                    .last()
                    .map(|p| p.seq)
                    .ok_or(StoreError::NoConsistentPoint)?
            }
        };
        while self.state.last_seq > target {
            let seq = self.state.last_seq;
            let undo = self.undo_path(seq);
            self.apply_undo(&undo)?;
            self.state.history.retain(|p| p.seq < seq);
            let prev = self.state.history.last().cloned();
            self.state.last_seq = seq - 1;
            self.state.last_checksum = prev.as_ref().map_or(0, |p| p.checksum);
            self.state.in_resync = prev.is_some_and(|p| !p.consistent);
            self.save()?;
            std::fs::remove_file(&undo).map_err(ioe(&undo))?;
        }
        self.state.promoted = true;
        self.save()?;
        Ok(target)
    }

    fn save(&self) -> Result<(), StoreError> {
        let p = self.dir.join("state.json");
        let bytes =
            serde_json::to_vec_pretty(&self.state).map_err(|e| StoreError::State(p.clone(), e))?;
        let tmp = self.dir.join("state.json.tmp");
        write_synced(&tmp, &bytes)?;
        std::fs::rename(&tmp, &p).map_err(ioe(&p))?;
        crate::journal::writer::sync_dir(&self.dir).map_err(ioe(&self.dir))
    }
}

fn touches_data(kind: RecordKind) -> bool {
    matches!(
        kind,
        RecordKind::Write
            | RecordKind::Discard
            | RecordKind::WriteZeroes
            | RecordKind::ResyncData
            | RecordKind::ResyncZero
    )
}

fn apply_record(
    rec: &Record<'_>,
    disks: &mut [(u16, File, PathBuf)],
    in_resync: &mut bool,
) -> std::io::Result<()> {
    match rec.kind {
        RecordKind::ResyncBegin => *in_resync = true,
        RecordKind::ResyncEnd => *in_resync = false,
        RecordKind::Flush => {}
        _ => {
            let Some((_, f, _)) = disks.iter().find(|d| d.0 == rec.disk) else {
                return Ok(());
            };
            if rec.kind.has_data() {
                f.write_all_at(rec.data, rec.offset)?;
            } else {
                write_zeroes(f, rec.offset, rec.len)?;
            }
        }
    }
    Ok(())
}

/// Zeroes a range: punch a hole (thin replica), else write zeros.
fn write_zeroes(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    let zeros = vec![0u8; IO_CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(IO_CHUNK as u64)).unwrap_or(IO_CHUNK);
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(path).map_err(ioe(path))?;
    f.write_all(bytes).map_err(ioe(path))?;
    f.sync_all().map_err(ioe(path))
}

struct CrcWriter<W: Write> {
    w: W,
    crc: u32,
}

impl<W: Write> CrcWriter<W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.w.write_all(b)
    }
}
