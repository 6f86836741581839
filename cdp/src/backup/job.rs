//! Backup jobs: full, and incremental from a vhost disk's CBT bitmap.
//!
//! Freeze/reset protocol (with [`keel_vhost::Cbt`]): the job first calls
//! `freeze_and_reset`, which atomically takes the bitmap's bits out and
//! lets a fresh epoch track from that instant. The frozen bits say which
//! chunks changed since the parent point. On success nothing more is done
//! (the reset already happened); on any failure the job calls
//! `merge_back`, so the bits return to the live bitmap and the next job
//! copies them again. A frozen bitmap marked invalid (the backend crashed)
//! turns the job into a full backup, and the report says why.
//!
//! Chunks are processed by `threads` workers, each reading, hashing,
//! zero-checking and compressing whole chunks; the next chunk index comes
//! from one atomic counter.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use keel_vhost::cbt::{Cbt, CbtError, FrozenBitmap};

use crate::backup::chunk::{self, ChunkError, Digest, Encoder};
use crate::backup::index::{BackupIndex, CbtSource, Kind};
use crate::backup::repo::{RepoError, Repository};

/// Default chunk size (PBS uses 4 MiB fixed chunks for VM images).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// Errors of a backup job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Chunk size not a multiple of 4 KiB and of the CBT granularity, or too big.
    #[error("Invalid chunk size {0}")]
    ChunkSize(u64),
    /// Opening / sizing the source failed.
    #[error("Cannot open source {0}")]
    OpenSource(PathBuf, #[source] std::io::Error),
    /// Reading the source failed.
    #[error("Cannot read source at offset {offset}")]
    ReadSource {
        /// Offset.
        offset: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The source size differs from the CBT's disk size.
    #[error("Source has {source_size} bytes, the dirty bitmap covers {bitmap_size}")]
    SizeMismatch {
        /// Source size.
        source_size: u64,
        /// Bitmap coverage.
        bitmap_size: u64,
    },
    /// Freezing or merging the bitmap failed.
    #[error("Dirty bitmap operation failed")]
    Cbt(#[source] CbtError),
    /// Compressing failed.
    #[error("Cannot encode chunk")]
    Encode(#[source] ChunkError),
    /// Repository operation failed.
    #[error("Repository operation failed")]
    Repo(#[source] RepoError),
    /// A worker thread panicked.
    #[error("Backup worker panicked")]
    Worker,
}

/// What to back up.
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// Disk / volume name (points are grouped by it).
    pub disk: String,
    /// Raw image or block device to read.
    pub source: PathBuf,
    /// Bytes per chunk: a multiple of 4 KiB and of the CBT granularity.
    pub chunk_size: u64,
    /// Worker threads.
    pub threads: usize,
    /// zstd level.
    pub zstd_level: i32,
    /// The source is a scratch copy (a staging file): each chunk's range
    /// is punched out once read, so its page-cache pages are dropped
    /// instead of written back to the disk under the repository's fsyncs.
    pub scratch_source: bool,
}

impl BackupSpec {
    /// Defaults: 4 MiB chunks, zstd-1, one thread per CPU.
    pub fn new(disk: &str, source: &Path) -> Self {
        Self {
            disk: disk.to_owned(),
            source: source.to_owned(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            zstd_level: 1,
            scratch_source: false,
        }
    }
}

/// The dirty-block source of an incremental.
#[derive(Clone, Copy)]
pub enum Tracking<'a> {
    /// No CBT: always full.
    None,
    /// The disk's live tracker and the bitmap this backup chain uses.
    Cbt {
        /// The tracker (shared with the running backend).
        cbt: &'a Cbt,
        /// Bitmap name.
        bitmap: &'a str,
    },
}

/// Progress of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes processed.
    pub done: u64,
    /// Bytes to process in this job.
    pub total: u64,
}

/// What a job did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackupReport {
    /// The new point.
    pub id: String,
    /// Full or incremental.
    pub kind: Kind,
    /// Why an incremental was not possible, if it was wanted.
    pub fallback: Option<String>,
    /// Chunks of the disk.
    pub chunks_total: u64,
    /// Chunks read from the source.
    pub chunks_read: u64,
    /// Chunks read that were all zero (not stored).
    pub chunks_zero: u64,
    /// Chunks read that were already stored (dedup).
    pub chunks_dedup: u64,
    /// Chunks newly stored.
    pub chunks_stored: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the repository (compressed).
    pub bytes_stored: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Fingerprint of the key the point is encrypted with, if any.
    pub encryption: Option<String>,
    /// How long the disk's VM was paused for the point-in-time cut (set by
    /// callers that pause it; None when nothing was paused).
    pub paused_ms: Option<u64>,
}

/// Gives a frozen bitmap's bits back to its live tracker (the message
/// says why it could not).
pub type MergeBack<'a> = Box<dyn FnOnce(&FrozenBitmap) -> Result<(), String> + Send + 'a>;

/// A bitmap already frozen out of a live tracker (e.g. by a disk server
/// over its control socket), and how to give its bits back.
pub struct FrozenCbt<'a> {
    /// The frozen bits.
    pub bitmap: FrozenBitmap,
    /// ORs the bits back into the live bitmap; called when the job fails
    /// (or is dropped unfinished), so the next job copies them again.
    pub merge_back: MergeBack<'a>,
}

/// Which chunks a job reads and what it inherits (decided before reading).
struct Plan {
    size: u64,
    nchunks: usize,
    kind: Kind,
    chunks: Vec<Option<Digest>>,
    todo: Vec<usize>,
    parent: Option<String>,
    generation: u64,
    bitmap: Option<String>,
    fallback: Option<String>,
}

/// One backup job in steps: [`BackupJob::lock`] (the disk's job lock),
/// [`BackupJob::plan`] (what to read, from an optionally frozen bitmap),
/// [`BackupJob::run`] (read, store, publish). Between plan and run the
/// caller may move the chunks to read elsewhere (a point-in-time staging
/// copy of a disk in use) and run on that copy.
///
/// A job dropped without a successful `run` merges its frozen bitmap back.
pub struct BackupJob<'a> {
    repo: &'a Repository,
    spec: BackupSpec,
    frozen: Option<FrozenCbt<'a>>,
    plan: Option<Plan>,
    _disk_lock: crate::backup::repo::Lock,
    _repo_lock: crate::backup::repo::Lock,
}

impl<'a> BackupJob<'a> {
    /// Takes the disk's job lock (refused while another job holds it) and
    /// the repository's shared lock.
    pub fn lock(repo: &'a Repository, spec: &BackupSpec) -> Result<Self, JobError> {
        if spec.chunk_size == 0
            || !spec.chunk_size.is_multiple_of(4096)
            || spec.chunk_size > chunk::MAX_CHUNK_SIZE
        {
            return Err(JobError::ChunkSize(spec.chunk_size));
        }
        let _disk_lock = repo.lock_disk(&spec.disk).map_err(JobError::Repo)?;
        let _repo_lock = repo.lock_shared().map_err(JobError::Repo)?;
        Ok(Self {
            repo,
            spec: spec.clone(),
            frozen: None,
            plan: None,
            _disk_lock,
            _repo_lock,
        })
    }

    /// Decides what to read from a disk of `size` bytes: with a frozen
    /// bitmap, incremental from the newest point of its chain when the
    /// bitmap is valid and the geometry is unchanged, full otherwise;
    /// without one, full. Returns the chunk indices to read, ascending.
    pub fn plan(&mut self, size: u64, frozen: Option<FrozenCbt<'a>>) -> Result<&[usize], JobError> {
        // Owned from here: an error below merges the bits back (Drop).
        self.frozen = frozen;
        let spec = &self.spec;
        let frozen = self.frozen.as_ref().map(|f| &f.bitmap);
        let nchunks = usize::try_from(size.div_ceil(spec.chunk_size))
            .map_err(|_| JobError::ChunkSize(spec.chunk_size))?;
        if let Some(f) = frozen {
            if f.granularity == 0 || !spec.chunk_size.is_multiple_of(f.granularity) {
                return Err(JobError::ChunkSize(spec.chunk_size));
            }
            let covered = f.words.len() as u64 * 64 * f.granularity;
            if covered < size {
                return Err(JobError::SizeMismatch {
                    source_size: size,
                    bitmap_size: covered,
                });
            }
        }

        // Incremental needs: a valid bitmap and a parent of the same chain and
        // geometry (the bitmap's epoch started when the parent was taken).
        let bitmap = frozen.map(|f| f.name.clone());
        let parent = match &bitmap {
            Some(name) => latest_point(self.repo, &spec.disk, name)?,
            None => None,
        };
        let (mut fallback, mut incremental) = (None, None);
        if let (Some(f), Some(p)) = (frozen, parent) {
            if !f.valid {
                fallback = Some(
                    "dirty bitmap invalid (backend was not shut down cleanly, or the bitmap is \
                     new on a disk whose earlier writes were not tracked): full backup"
                        .to_owned(),
                );
            } else if p.encryption != self.repo.encryption() {
                fallback = Some(format!(
                    "encryption key changed since point {}: full backup",
                    p.id
                ));
            } else if p.disk_size != size || p.chunk_size != spec.chunk_size {
                fallback = Some(format!(
                    "disk size or chunk size changed since point {}: full backup",
                    p.id
                ));
            } else {
                incremental = Some((p, dirty_chunks(f, spec.chunk_size, nchunks)));
            }
        }
        let plan = match incremental {
            Some((p, todo)) => Plan {
                generation: p.cbt.as_ref().map_or(0, |c| c.generation) + 1,
                kind: Kind::Incremental,
                chunks: p.chunks,
                todo,
                parent: Some(p.id),
                size,
                nchunks,
                bitmap,
                fallback,
            },
            None => Plan {
                generation: 0,
                kind: Kind::Full,
                chunks: vec![None; nchunks],
                todo: (0..nchunks).collect(),
                parent: None,
                size,
                nchunks,
                bitmap,
                fallback,
            },
        };
        Ok(&self.plan.insert(plan).todo)
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.spec.chunk_size
    }

    /// Reads the planned chunks from `source` (the disk, or a copy of
    /// at least those chunks of the same size), stores them and publishes
    /// the point. On failure the frozen bitmap is merged back.
    pub fn run(
        mut self,
        source: &Path,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<BackupReport, JobError> {
        let report = self.execute(source, progress)?;
        // Published: the frozen bits are consumed.
        self.frozen = None;
        Ok(report)
    }

    fn execute(
        &mut self,
        source: &Path,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<BackupReport, JobError> {
        let start = Instant::now();
        let spec = &self.spec;
        let plan = self
            .plan
            .as_mut()
            .ok_or(JobError::ChunkSize(spec.chunk_size))?;
        let open_err = |e| JobError::OpenSource(source.to_owned(), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(spec.scratch_source)
            .open(source)
            .map_err(open_err)?;
        let size = source_size(&file).map_err(open_err)?;
        if size != plan.size {
            return Err(JobError::SizeMismatch {
                source_size: size,
                bitmap_size: plan.size,
            });
        }
        let total: u64 = plan
            .todo
            .iter()
            .map(|&i| spec.chunk_size.min(size - i as u64 * spec.chunk_size))
            .sum();
        let stats = Stats::default();
        let results = copy_chunks(
            self.repo, spec, &file, size, &plan.todo, total, &stats, progress,
        )?;
        let mut chunks = std::mem::take(&mut plan.chunks);
        for (i, d) in results {
            chunks[i] = d;
        }
        let mut index = BackupIndex {
            id: String::new(),
            disk: spec.disk.clone(),
            disk_size: size,
            chunk_size: spec.chunk_size,
            created_ms: now_ms(),
            kind: plan.kind,
            parent: plan.parent.clone(),
            cbt: plan.bitmap.clone().map(|bitmap| CbtSource {
                bitmap,
                generation: plan.generation,
            }),
            fallback: plan.fallback.clone(),
            chunks,
            encryption: self.repo.encryption(),
        };
        self.repo.publish(&mut index).map_err(JobError::Repo)?;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(BackupReport {
            id: index.id,
            kind: plan.kind,
            fallback: plan.fallback.clone(),
            chunks_total: plan.nchunks as u64,
            chunks_read: plan.todo.len() as u64,
            chunks_zero: l(&stats.zero),
            chunks_dedup: l(&stats.dedup),
            chunks_stored: l(&stats.stored),
            bytes_read: total,
            bytes_stored: l(&stats.bytes_stored),
            seconds: start.elapsed().as_secs_f64(),
            paused_ms: None,
            encryption: self.repo.encryption(),
        })
    }
}

impl Drop for BackupJob<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.frozen.take() {
            // The bits go back: the next job copies these chunks again.
            if let Err(e) = (f.merge_back)(&f.bitmap) {
                tracing::error!(error = %e, "cannot merge dirty bitmap back after a failed backup");
            }
        }
    }
}

/// Runs one backup of `spec.source` into `repo`: incremental from the
/// newest point of this disk and bitmap when the bitmap is valid, full
/// otherwise.
pub fn backup(
    repo: &Repository,
    spec: &BackupSpec,
    tracking: Tracking<'_>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<BackupReport, JobError> {
    let mut job = BackupJob::lock(repo, spec)?;
    let open_err = |e| JobError::OpenSource(spec.source.clone(), e);
    let size = source_size(&File::open(&spec.source).map_err(open_err)?).map_err(open_err)?;
    let frozen = match tracking {
        Tracking::None => None,
        Tracking::Cbt { cbt, bitmap } => {
            if !spec.chunk_size.is_multiple_of(cbt.granularity()) {
                return Err(JobError::ChunkSize(spec.chunk_size));
            }
            let frozen = cbt.freeze_and_reset(bitmap).map_err(JobError::Cbt)?;
            Some(FrozenCbt {
                bitmap: frozen,
                merge_back: Box::new(move |f: &FrozenBitmap| {
                    cbt.merge_back(f).map_err(|e| e.to_string())
                }),
            })
        }
    };
    job.plan(size, frozen)?;
    job.run(&spec.source, progress)
}

#[derive(Default)]
struct Stats {
    zero: AtomicU64,
    dedup: AtomicU64,
    stored: AtomicU64,
    bytes_stored: AtomicU64,
    done: AtomicU64,
}

/// Reads, hashes and stores chunks `todo` with `spec.threads` workers;
/// returns each chunk's digest (`None` = all zero). Shard directories are
/// fsynced before returning, so a point published afterwards is durable.
#[allow(clippy::too_many_arguments)]
fn copy_chunks(
    repo: &Repository,
    spec: &BackupSpec,
    file: &File,
    size: u64,
    todo: &[usize],
    total: u64,
    stats: &Stats,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<(usize, Option<Digest>)>, JobError> {
    let next = AtomicUsize::new(0);
    let dirs = Mutex::new(BTreeSet::new());
    let zeros = vec![
        0u8;
        usize::try_from(spec.chunk_size)
            .map_err(|_| JobError::ChunkSize(spec.chunk_size))?
    ];
    let worker = || -> Result<Vec<(usize, Option<Digest>)>, JobError> {
        let mut enc = Encoder::new(spec.zstd_level).map_err(JobError::Encode)?;
        let mut buf = vec![0u8; zeros.len()];
        let mut out = Vec::new();
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = todo.get(n) else {
                return Ok(out);
            };
            let offset = i as u64 * spec.chunk_size;
            let len = usize::try_from(spec.chunk_size.min(size - offset))
                .map_err(|_| JobError::ChunkSize(spec.chunk_size))?;
            let data = &mut buf[..len];
            file.read_exact_at(data, offset)
                .map_err(|source| JobError::ReadSource { offset, source })?;
            if spec.scratch_source {
                punch(file, offset, len as u64);
            }
            // A slice compare is a memcmp: cheap even in debug builds.
            let digest = if *data == zeros[..len] {
                stats.zero.fetch_add(1, Ordering::Relaxed);
                None
            } else {
                let d = repo.digest(data);
                if repo.has_chunk(&d) {
                    stats.dedup.fetch_add(1, Ordering::Relaxed);
                } else {
                    let stored = enc.encode(data, repo.key()).map_err(JobError::Encode)?;
                    let dir = repo.put_chunk(&d, &stored).map_err(JobError::Repo)?;
                    stats.stored.fetch_add(1, Ordering::Relaxed);
                    stats
                        .bytes_stored
                        .fetch_add(stored.len() as u64, Ordering::Relaxed);
                    if let Ok(mut dirs) = dirs.lock() {
                        dirs.insert(dir);
                    }
                }
                Some(d)
            };
            out.push((i, digest));
            let done = stats.done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
            progress(Progress { done, total });
        }
    };
    let threads = spec.threads.clamp(1, 64).min(todo.len().max(1));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(JobError::Worker)))
            .collect()
    });
    let mut all = Vec::with_capacity(todo.len());
    for r in results {
        all.extend(r?);
    }
    let dirs = dirs.into_inner().unwrap_or_default();
    repo.sync_chunk_dirs(&dirs).map_err(JobError::Repo)?;
    Ok(all)
}

/// Frees `len` bytes at `offset` of a scratch file (best effort: a file
/// system without hole punching just keeps the data until the file goes).
fn punch(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate on an fd we own; no memory is passed.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        );
    }
}

/// Chunks touched by any dirty granule (chunk size is a multiple of the
/// granularity, so each granule lies in exactly one chunk).
fn dirty_chunks(f: &FrozenBitmap, chunk_size: u64, nchunks: usize) -> Vec<usize> {
    let per_chunk = chunk_size / f.granularity;
    let mut out: Vec<usize> = f
        .dirty_granules()
        .into_iter()
        .filter_map(|g| usize::try_from(g / per_chunk).ok())
        .filter(|&c| c < nchunks)
        .collect();
    out.dedup();
    out
}

/// The newest point of `disk` taken against `bitmap`.
fn latest_point(
    repo: &Repository,
    disk: &str,
    bitmap: &str,
) -> Result<Option<BackupIndex>, JobError> {
    let points = repo.points().map_err(JobError::Repo)?;
    Ok(points
        .into_iter()
        .rfind(|p| p.disk == disk && p.cbt.as_ref().is_some_and(|c| c.bitmap == bitmap)))
}

/// Size of a regular file or block device.
pub(crate) fn source_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
