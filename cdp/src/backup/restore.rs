//! Restore a point to a new raw file or over an existing disk, then verify
//! the written image against the index.
//!
//! Chunks are fetched, decompressed and checked by `threads` workers (each
//! has one chunk in flight: read, decode, hash, `pwrite`). All-zero chunks
//! are not written to a new file (it stays sparse) and are punched out of
//! an existing one. A chunk that fails its digest stops the restore with
//! the point and offset; a new file is then removed, never left looking
//! complete.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::backup::index::BackupIndex;
use crate::backup::job::{source_size, Progress};
use crate::backup::repo::{RepoError, Repository};

/// Errors of restore and image verification.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Repository operation failed (e.g. missing point).
    #[error("Repository operation failed")]
    Repo(#[source] RepoError),
    /// A chunk is missing or corrupt.
    #[error("Point {point}: chunk at offset {offset} is bad")]
    BadChunk {
        /// Point id.
        point: String,
        /// Disk offset.
        offset: u64,
        /// Cause.
        #[source]
        source: RepoError,
    },
    /// The target cannot be created / opened / written.
    #[error("Cannot {op} target {path}")]
    Target {
        /// What was attempted.
        op: &'static str,
        /// Target path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An in-place target has a different size.
    #[error("Target has {target} bytes, the point {point}")]
    TargetSize {
        /// Target size.
        target: u64,
        /// Point disk size.
        point: u64,
    },
    /// Read-back after restore differs from the index.
    #[error("Restored image differs from point {point} at offset {offset}")]
    Mismatch {
        /// Point id.
        point: String,
        /// First differing chunk offset.
        offset: u64,
    },
    /// A worker thread panicked.
    #[error("Restore worker panicked")]
    Worker,
}

/// Where to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Create a new file (fails if it exists); sparse.
    NewFile,
    /// Overwrite an existing disk of the same size (VM off).
    InPlace,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RestoreReport {
    /// Point restored.
    pub point: String,
    /// Chunks written.
    pub chunks_written: u64,
    /// Zero chunks skipped / punched.
    pub chunks_zero: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Read back and re-hashed after writing.
    pub verified: bool,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Restores point `id` to `target`, then verifies the target.
pub fn restore(
    repo: &Repository,
    id: &str,
    target: &Path,
    mode: RestoreMode,
    threads: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, RestoreError> {
    let start = Instant::now();
    let _lock = repo.lock_shared().map_err(RestoreError::Repo)?;
    let index = repo.load(id).map_err(RestoreError::Repo)?;
    repo.check_key(&index).map_err(RestoreError::Repo)?;
    let terr = |op| {
        move |source| RestoreError::Target {
            op,
            path: target.to_owned(),
            source,
        }
    };
    let file = match mode {
        RestoreMode::NewFile => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(terr("create"))?;
            f.set_len(index.disk_size).map_err(terr("size"))?;
            f
        }
        RestoreMode::InPlace => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(target)
                .map_err(terr("open"))?;
            let size = source_size(&f).map_err(terr("size"))?;
            if size != index.disk_size {
                return Err(RestoreError::TargetSize {
                    target: size,
                    point: index.disk_size,
                });
            }
            f
        }
    };
    let result = write_chunks(repo, &index, &file, target, mode, threads, progress).and_then(|r| {
        file.sync_all().map_err(terr("fsync"))?;
        verify_image(repo, &file, &index, threads)?;
        Ok(r)
    });
    match result {
        Ok((written, zero, bytes)) => Ok(RestoreReport {
            point: index.id,
            chunks_written: written,
            chunks_zero: zero,
            bytes_written: bytes,
            verified: true,
            seconds: start.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            if mode == RestoreMode::NewFile {
                let _ = std::fs::remove_file(target);
            }
            Err(e)
        }
    }
}

fn write_chunks(
    repo: &Repository,
    index: &BackupIndex,
    file: &File,
    target: &Path,
    mode: RestoreMode,
    threads: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(u64, u64, u64), RestoreError> {
    let next = AtomicUsize::new(0);
    let (written, zero, bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let done = AtomicU64::new(0);
    let terr = |op| {
        move |source| RestoreError::Target {
            op,
            path: target.to_owned(),
            source,
        }
    };
    let worker = || -> Result<(), RestoreError> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(entry) = index.chunks.get(i) else {
                return Ok(());
            };
            let offset = index.offset(i);
            let len = index.chunk_len(i);
            match entry {
                None => {
                    if mode == RestoreMode::InPlace {
                        zero_range(file, offset, len).map_err(terr("zero"))?;
                    }
                    zero.fetch_add(1, Ordering::Relaxed);
                }
                Some(d) => {
                    let data = repo.get_chunk(d).map_err(|source| RestoreError::BadChunk {
                        point: index.id.clone(),
                        offset,
                        source,
                    })?;
                    if data.len() as u64 != len {
                        return Err(RestoreError::Mismatch {
                            point: index.id.clone(),
                            offset,
                        });
                    }
                    file.write_all_at(&data, offset).map_err(terr("write"))?;
                    written.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(len, Ordering::Relaxed);
                }
            }
            let d = done.fetch_add(len, Ordering::Relaxed) + len;
            progress(Progress {
                done: d,
                total: index.disk_size,
            });
        }
    };
    run_workers(threads, index.chunks.len(), worker)?;
    Ok((written.into_inner(), zero.into_inner(), bytes.into_inner()))
}

fn run_workers(
    threads: usize,
    items: usize,
    worker: impl Fn() -> Result<(), RestoreError> + Sync,
) -> Result<(), RestoreError> {
    let threads = threads.clamp(1, 64).min(items.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(&worker)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(RestoreError::Worker)))
            .collect::<Result<Vec<()>, _>>()
    })
    .map(|_| ())
}

/// Makes `offset..offset+len` read zero: punches a hole, or writes zeros
/// where the file system cannot.
fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.write_all_at(&zeros, offset)
}

/// Re-reads `file` and checks every chunk against `index` (zero chunks
/// must read zero); `repo` names chunks (keyed for an encrypted point).
pub fn verify_image(
    repo: &Repository,
    file: &File,
    index: &BackupIndex,
    threads: usize,
) -> Result<(), RestoreError> {
    let next = AtomicUsize::new(0);
    let cs = usize::try_from(index.chunk_size).unwrap_or(usize::MAX);
    let zeros = vec![0u8; cs];
    let worker = || -> Result<(), RestoreError> {
        let mut buf = vec![0u8; cs];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(entry) = index.chunks.get(i) else {
                return Ok(());
            };
            let offset = index.offset(i);
            let len = usize::try_from(index.chunk_len(i)).unwrap_or(cs);
            let data = &mut buf[..len];
            let mismatch = || RestoreError::Mismatch {
                point: index.id.clone(),
                offset,
            };
            file.read_exact_at(data, offset).map_err(|_| mismatch())?;
            let ok = match entry {
                None => *data == zeros[..len],
                Some(d) => repo.digest(data) == *d,
            };
            if !ok {
                return Err(mismatch());
            }
        }
    };
    run_workers(threads, index.chunks.len(), worker)
}
