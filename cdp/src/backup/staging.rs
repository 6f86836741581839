//! Point-in-time staging copies of a disk in use: while its VM is paused,
//! the chunks a backup job will read are copied into a sparse file of the
//! disk's size, the VM resumes, and the job reads the copy.
//!
//! Only what the job reads is copied (the pause lasts as long as the copy):
//! a full backup's chunks are the whole disk, of which only allocated data
//! is copied (`SEEK_DATA`/`SEEK_HOLE`), so holes stay holes and a thin disk
//! costs its used size; an incremental's chunks are the frozen dirty ones.
//! The copy uses `copy_file_range` (in-kernel, a reflink on file systems
//! that share extents), falling back to read/write.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors of a staging copy.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// Opening or sizing the disk failed.
    #[error("Cannot open disk {0}")]
    OpenSource(PathBuf, #[source] std::io::Error),
    /// Creating the staging file failed.
    #[error("Cannot create staging file {0}")]
    Create(PathBuf, #[source] std::io::Error),
    /// Copying failed.
    #[error("Cannot copy disk range at offset {offset}")]
    Copy {
        /// Offset.
        offset: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a staging copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingReport {
    /// Disk (and staging file) size.
    pub size: u64,
    /// Data bytes copied (holes are not).
    pub bytes_copied: u64,
}

/// Copies chunks `chunks` (indices of `chunk_size`-byte chunks, ascending)
/// of `source` into a new sparse file `dest` of the same size (replaced if
/// present, mode 0600). Ranges that are holes in `source` stay holes.
pub fn copy_chunks_sparse(
    source: &Path,
    dest: &Path,
    chunk_size: u64,
    chunks: &[usize],
) -> Result<StagingReport, StagingError> {
    let open_err = |e| StagingError::OpenSource(source.to_owned(), e);
    let src = File::open(source).map_err(open_err)?;
    let size = crate::backup::job::source_size(&src).map_err(open_err)?;
    let create_err = |e| StagingError::Create(dest.to_owned(), e);
    let _ = std::fs::remove_file(dest);
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(create_err)?;
    dst.set_len(size).map_err(create_err)?;
    let mut copied = 0u64;
    let mut buf = Vec::new();
    for (start, end) in ranges(chunks, chunk_size, size) {
        let mut pos = start;
        while pos < end {
            let Some((data, hole)) = next_data(&src, pos).map_err(|source| StagingError::Copy {
                offset: pos,
                source,
            })?
            else {
                break;
            };
            if data >= end {
                break;
            }
            let stop = hole.min(end);
            copy_range(&src, &dst, data, stop - data, &mut buf).map_err(|source| {
                StagingError::Copy {
                    offset: data,
                    source,
                }
            })?;
            copied += stop - data;
            pos = stop;
        }
    }
    Ok(StagingReport {
        size,
        bytes_copied: copied,
    })
}

/// Adjacent chunks merged into byte ranges, clipped to `size`.
fn ranges(chunks: &[usize], chunk_size: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        let start = (c as u64).saturating_mul(chunk_size);
        if start >= size {
            continue;
        }
        let end = start.saturating_add(chunk_size).min(size);
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// The next data extent at or after `pos`: (data start, hole start).
fn next_data(f: &File, pos: u64) -> std::io::Result<Option<(u64, u64)>> {
    let seek = |off: u64, whence| -> std::io::Result<Option<u64>> {
        let off = libc::off_t::try_from(off).map_err(std::io::Error::other)?;
        // SAFETY: lseek on an fd we own; no memory is passed.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data (or hole) past `off`.
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(u64::try_from(r).map_err(std::io::Error::other)?))
    };
    let Some(data) = seek(pos, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    // There is always a hole at the end of file (EOF counts as one).
    let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(u64::MAX);
    Ok(Some((data, hole)))
}

/// Copies `len` bytes at `offset` (same offset in both files).
fn copy_range(
    src: &File,
    dst: &File,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut done = 0u64;
    let mut in_kernel = true;
    while done < len {
        let at = offset + done;
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(64 << 20);
        if in_kernel {
            let mut off_in = libc::loff_t::try_from(at).map_err(std::io::Error::other)?;
            let mut off_out = off_in;
            // SAFETY: both fds are ours and open; the offsets are passed
            // by pointer to locals that outlive the call.
            let r = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if r > 0 {
                done += u64::try_from(r).map_err(std::io::Error::other)?;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match (r, e.raw_os_error()) {
                (0, _) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "disk shrank during the copy",
                    ))
                }
                (_, Some(libc::EINTR)) => continue,
                (_, Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) => {
                    in_kernel = false;
                    continue;
                }
                _ => return Err(e),
            }
        }
        let n = want.min(1 << 20);
        buf.resize(n, 0);
        src.read_exact_at(&mut buf[..n], at)?;
        dst.write_all_at(&buf[..n], at)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    /// Extents of data in `f`, as (start, end).
    fn extents(f: &File) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some((d, h)) = next_data(f, pos).unwrap() {
            let end = h.min(f.metadata().unwrap().len());
            if d >= end {
                break;
            }
            out.push((d, end));
            pos = end;
        }
        out
    }

    #[test]
    fn copies_only_the_chunks_asked_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("disk.raw");
        let src = File::create(&src_path).unwrap();
        let size = 32 * CHUNK + 4096; // a partial last chunk
        src.set_len(size).unwrap();
        // Data in chunks 1, 2 (one extent across both), 5, 9 and the tail.
        let fill = |c: u64, b: u8, len: u64| {
            src.write_all_at(&vec![b; usize::try_from(len).unwrap()], c * CHUNK)
                .unwrap()
        };
        fill(1, 0xa1, 2 * CHUNK);
        fill(5, 0xa5, 4096);
        fill(9, 0xa9, CHUNK);
        fill(32, 0xff, 4096);
        src.sync_all().unwrap();
        let src_extents = extents(&src);
        if src_extents.len() <= 1 {
            eprintln!("file system reports no holes; skipping hole checks");
        }

        // Full: every chunk; data copied, holes kept.
        let dest = dir.path().join("staging.raw");
        let all: Vec<usize> = (0..33).collect();
        let r = copy_chunks_sparse(&src_path, &dest, CHUNK, &all).unwrap();
        assert_eq!(r.size, size);
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(&src_path).unwrap()
        );
        let d = File::open(&dest).unwrap();
        if src_extents.len() > 1 {
            assert_eq!(r.bytes_copied, 2 * CHUNK + 4096 + CHUNK + 4096);
            // Data only where the source has data (extents may be rounded
            // to the file system block, never grown into the holes).
            for (s, e) in extents(&d) {
                assert!(
                    src_extents.iter().any(|&(ss, se)| ss <= s && e <= se),
                    "staging extent {s}..{e} is outside the data {src_extents:?}"
                );
            }
        }

        // Incremental: chunks 2 and 9 only (1 and 5 hold data, not asked).
        let r = copy_chunks_sparse(&src_path, &dest, CHUNK, &[2, 9]).unwrap();
        assert_eq!(r.bytes_copied, 2 * CHUNK);
        let staged = std::fs::read(&dest).unwrap();
        assert_eq!(staged.len() as u64, size);
        let chunk = |c: u64| {
            &staged[usize::try_from(c * CHUNK).unwrap()..][..usize::try_from(CHUNK).unwrap()]
        };
        assert!(chunk(1).iter().all(|&b| b == 0), "chunk 1 not asked");
        assert!(chunk(2).iter().all(|&b| b == 0xa1));
        assert!(chunk(5).iter().all(|&b| b == 0), "chunk 5 not asked");
        assert!(chunk(9).iter().all(|&b| b == 0xa9));
        assert!(staged[usize::try_from(32 * CHUNK).unwrap()..]
            .iter()
            .all(|&b| b == 0));
        if src_extents.len() > 1 {
            let d = File::open(&dest).unwrap();
            let ext = extents(&d);
            assert!(
                ext.iter().all(|&(s, e)| (2 * CHUNK <= s && e <= 3 * CHUNK)
                    || (9 * CHUNK <= s && e <= 10 * CHUNK)),
                "{ext:?}"
            );
        }

        // Nothing asked: an empty sparse file of the disk's size.
        let r = copy_chunks_sparse(&src_path, &dest, CHUNK, &[]).unwrap();
        assert_eq!((r.size, r.bytes_copied), (size, 0));
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), size);
    }

    #[test]
    fn adjacent_chunks_merge_and_the_tail_is_clipped() {
        assert_eq!(
            ranges(&[0, 1, 3, 4, 7], 10, 75),
            vec![(0, 20), (30, 50), (70, 75)]
        );
        assert_eq!(ranges(&[8], 10, 75), vec![]);
    }
}
