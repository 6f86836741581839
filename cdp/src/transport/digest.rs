//! Delta resync: before a pending full resync starts, the shipper asks the
//! replica for the SHA-256 of each dirty chunk of its disks and clears the
//! dirty bits of the chunks whose content the replica already holds, so
//! only differing chunks travel. One mechanism for a restart after a
//! crash, a protection restart after a switchover and a reverse
//! protection (the old primary's disks adopted as replica disks).
//!
//! # Why this is race-free
//! - The comparison runs only while the journal holds the resync
//!   ([`Journal::resync_held`]): the group is in dirty mode since the
//!   journal started and journals nothing, and the shipper asks only once
//!   the replica acknowledged every sealed segment. The replica therefore
//!   sits at the end of the journal: nothing queued for it can later
//!   overwrite a chunk judged equal. It answers between segments, never
//!   mid-apply.
//! - Per chunk: take the dirty bit, then read and hash the source chunk;
//!   set the bit again when the replica's digest differs. A guest write
//!   completes (data in the page cache) before its hook sets the bit: one
//!   that set it before the take is in what was read, one that sets it
//!   after the take leaves it set. No write is lost either way.
//! - The writer marks the journal clean only when no hold is pending (it
//!   reads the hold before the dirty count), so a stop during the pass,
//!   with bits taken out, never looks clean.
//!
//! A replica that answers garbage (wrong disk, range or count, unknown
//! version, malformed entries) is refused: the pass stops, the hold ends,
//! and the resync copies every chunk not yet proven equal. So does a
//! replica whose connection drops during [`MAX_INTERRUPTED`] passes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest as _, Sha256};

use super::wire::{Frame, WireError, DIGEST_LEN, DIGEST_VERSION, MAX_DIGEST_BATCH};
use crate::journal::{ChunkMap, Journal};

/// Largest chunk a replica hashes on request (bounds one request's work).
pub const MAX_DIGEST_CHUNK: u64 = 1 << 20;
/// Passes cut short by the connection before the resync goes ahead in
/// full (a replica that drops every digest request, e.g. an older keel,
/// must not hold the resync forever).
pub const MAX_INTERRUPTED: u64 = 3;

/// Errors of a digest pass.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// Talking to the replica failed (the pass is retried on the next
    /// connection).
    #[error("Digest exchange failed")]
    Wire(#[from] WireError),
    /// The shipper is stopping (the pass runs again after a restart).
    #[error("Stopped during the digest comparison")]
    Stopped,
    /// Reading a source disk failed.
    #[error("Cannot read source disk {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The replica answered something that is not the requested digests.
    #[error("Replica answered invalid digests ({0}): refused, resyncing in full")]
    Invalid(String),
    /// The replica refused the request.
    #[error("Replica refused the digest request: {0}; resyncing in full")]
    Refused(String),
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    /// Dirty chunks compared.
    pub compared: u64,
    /// Chunks the replica already held (dirty bit cleared).
    pub equal: u64,
    /// Their bytes.
    pub bytes_saved: u64,
}

/// The digest of a chunk's bytes.
pub fn digest(bytes: &[u8]) -> [u8; DIGEST_LEN] {
    Sha256::digest(bytes).into()
}

/// Runs one pass over every dirty chunk of `journal` against the replica
/// on `s`, then ends the hold; a garbage answer also ends it (full resync).
/// On a connection or source-read error, or when `stop` is set, the hold
/// stays and the pass runs again on the next connection; bits taken out
/// are put back first.
pub fn pass<S: Read + Write>(
    journal: &Journal,
    s: &mut S,
    stop: &AtomicBool,
) -> Result<PassReport, DigestError> {
    let mut report = PassReport::default();
    let r = pass_inner(journal, s, stop, &mut report);
    // What a cut-short pass cleared stays cleared: count it too.
    let jc = &journal.counters;
    jc.digest_compared
        .fetch_add(report.compared, Ordering::Relaxed);
    jc.digest_equal.fetch_add(report.equal, Ordering::Relaxed);
    jc.digest_bytes_saved
        .fetch_add(report.bytes_saved, Ordering::Relaxed);
    let interrupted = match &r {
        Err(DigestError::Wire(_)) => {
            journal
                .counters
                .digest_interrupted
                .fetch_add(1, Ordering::Relaxed)
                + 1
        }
        _ => 0,
    };
    if interrupted >= MAX_INTERRUPTED {
        tracing::warn!(
            interrupted,
            "digest comparison keeps failing: resyncing in full"
        );
    }
    if interrupted >= MAX_INTERRUPTED
        || matches!(
            r,
            Ok(()) | Err(DigestError::Invalid(_) | DigestError::Refused(_))
        )
    {
        journal.release_resync_hold();
    }
    tracing::info!(
        group = journal.config().group_id,
        compared = report.compared,
        equal = report.equal,
        bytes_saved = report.bytes_saved,
        dirty_left = journal.dirty_chunks(),
        complete = r.is_ok(),
        "digest comparison with the replica"
    );
    r.map(|()| report)
}

fn pass_inner<S: Read + Write>(
    journal: &Journal,
    s: &mut S,
    stop: &AtomicBool,
    report: &mut PassReport,
) -> Result<(), DigestError> {
    let cfg = journal.config();
    let chunk = cfg.chunk_bytes;
    let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(64 << 10)];
    for (d, entry) in journal.disks().iter().enumerate() {
        let Some(dirty) = journal.dirty_map(d) else {
            continue;
        };
        let path = &cfg.disks[d];
        let file = File::open(path).map_err(|e| DigestError::Read(path.clone(), e))?;
        let mut from = 0;
        while let Some(first) = dirty.next_set(from) {
            // A large disk takes a while: a stop must not wait for it.
            if stop.load(Ordering::Acquire) {
                return Err(DigestError::Stopped);
            }
            let count = (dirty.chunks() - first).min(u64::from(MAX_DIGEST_BATCH));
            Frame::DigestRequest {
                version: DIGEST_VERSION,
                disk: entry.id,
                chunk_bytes: chunk,
                disk_size: entry.size,
                first_chunk: first,
                count: u32::try_from(count).unwrap_or(MAX_DIGEST_BATCH),
            }
            .write_to(s)?;
            // Hash the source side while the replica hashes its side.
            let mut taken = Vec::new();
            let local = hash_taken(
                dirty, &file, path, first, count, chunk, entry.size, &mut buf, &mut taken,
            );
            let answer = local.and_then(|()| read_answer(s, entry.id, first, count));
            let remote = match answer {
                Ok(r) => r,
                Err(e) => {
                    for (c, _) in &taken {
                        dirty.set(*c);
                    }
                    return Err(e);
                }
            };
            for (c, h) in taken {
                report.compared += 1;
                let i = usize::try_from(c - first).unwrap_or(usize::MAX);
                if remote.get(i).copied().flatten() == Some(h) {
                    report.equal += 1;
                    report.bytes_saved += chunk.min(entry.size - c * chunk);
                } else {
                    dirty.set(c);
                }
            }
            from = first + count;
        }
    }
    Ok(())
}

/// Takes the dirty bits of `first..first+count` out and hashes those
/// chunks of the source disk into `taken`.
#[allow(clippy::too_many_arguments)]
fn hash_taken(
    dirty: &ChunkMap,
    file: &File,
    path: &Path,
    first: u64,
    count: u64,
    chunk: u64,
    size: u64,
    buf: &mut [u8],
    taken: &mut Vec<(u64, [u8; DIGEST_LEN])>,
) -> Result<(), DigestError> {
    let mut c = dirty.next_set(first);
    while let Some(cur) = c.filter(|&x| x < first + count) {
        c = dirty.next_set(cur + 1);
        if !dirty.take(cur) {
            continue;
        }
        let offset = cur * chunk;
        let len = usize::try_from(chunk.min(size - offset)).unwrap_or(0);
        if let Err(e) = file.read_exact_at(&mut buf[..len], offset) {
            dirty.set(cur);
            return Err(DigestError::Read(path.to_owned(), e));
        }
        taken.push((cur, digest(&buf[..len])));
    }
    Ok(())
}

/// Reads the replica's answer to a request and checks it matches.
fn read_answer<S: Read>(
    s: &mut S,
    disk: u16,
    first: u64,
    count: u64,
) -> Result<Vec<Option<[u8; DIGEST_LEN]>>, DigestError> {
    let frame = match Frame::read_from(s) {
        Ok(f) => f,
        Err(WireError::Malformed(m)) => return Err(DigestError::Invalid(m.to_owned())),
        Err(e) => return Err(e.into()),
    };
    match frame {
        Frame::Digests {
            version,
            disk: d,
            first_chunk,
            digests,
        } => {
            if version != DIGEST_VERSION {
                return Err(DigestError::Invalid(format!("version {version}")));
            }
            if d != disk || first_chunk != first || digests.len() as u64 != count {
                return Err(DigestError::Invalid(format!(
                    "asked disk {disk} chunks {first}+{count}, got disk {d} chunks {first_chunk}+{}",
                    digests.len()
                )));
            }
            Ok(digests)
        }
        Frame::Refuse { reason } => Err(DigestError::Refused(reason)),
        other => Err(DigestError::Invalid(format!(
            "unexpected {}",
            frame_name(&other)
        ))),
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Segment { .. } => "segment",
        Frame::Ack { .. } => "ack",
        Frame::Refuse { .. } => "refuse",
        Frame::DigestRequest { .. } => "digest request",
        Frame::Digests { .. } => "digests",
    }
}

/// The replica's answer to a digest request on the disk files of `dir`
/// (`disk-<id>.raw`, adopted or replicated), at its applied state. Err:
/// the reason to refuse the request.
pub fn answer(dir: &Path, request: &Frame) -> Result<Frame, String> {
    let &Frame::DigestRequest {
        version,
        disk,
        chunk_bytes,
        disk_size,
        first_chunk,
        count,
    } = request
    else {
        return Err("not a digest request".into());
    };
    if version != DIGEST_VERSION {
        return Err(format!("digest version {version} not supported"));
    }
    if !chunk_bytes.is_power_of_two() || !(4096..=MAX_DIGEST_CHUNK).contains(&chunk_bytes) {
        return Err(format!("digest chunk size {chunk_bytes} out of range"));
    }
    if count == 0 || count > MAX_DIGEST_BATCH {
        return Err(format!("digest count {count} out of range"));
    }
    let end = first_chunk
        .checked_add(u64::from(count))
        .and_then(|e| e.checked_mul(chunk_bytes))
        .ok_or("digest range overflows")?;
    if end - chunk_bytes >= disk_size {
        return Err("digest range beyond the disk".into());
    }
    let path = dir.join(format!("disk-{disk}.raw"));
    // A missing replica disk holds nothing: every chunk differs.
    let file = File::open(&path).ok();
    let have = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let mut buf = vec![0u8; usize::try_from(chunk_bytes).unwrap_or(0)];
    let mut digests = Vec::with_capacity(count as usize);
    for c in first_chunk..first_chunk + u64::from(count) {
        let offset = c * chunk_bytes;
        let len = chunk_bytes.min(disk_size - offset);
        let d = match &file {
            Some(f) if offset + len <= have => {
                let b = &mut buf[..usize::try_from(len).unwrap_or(0)];
                f.read_exact_at(b, offset)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Some(digest(b))
            }
            _ => None,
        };
        digests.push(d);
    }
    Ok(Frame::Digests {
        version: DIGEST_VERSION,
        disk,
        first_chunk,
        digests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: u8, chunk_bytes: u64, disk_size: u64, first: u64, count: u32) -> Frame {
        Frame::DigestRequest {
            version,
            disk: 0,
            chunk_bytes,
            disk_size,
            first_chunk: first,
            count,
        }
    }

    #[test]
    fn replica_answers_its_disk_and_refuses_out_of_range_requests() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 4096u64;
        // The replica disk holds 2.5 chunks of a 4-chunk source disk.
        let data: Vec<u8> = [[1u8; 4096], [2; 4096], [3; 4096]].concat()[..10240].to_vec();
        std::fs::write(dir.path().join("disk-0.raw"), &data).unwrap();
        let Ok(Frame::Digests { digests, .. }) =
            answer(dir.path(), &request(DIGEST_VERSION, chunk, 4 * chunk, 0, 4))
        else {
            panic!("no digests");
        };
        assert_eq!(digests[0], Some(digest(&data[..4096])));
        assert_eq!(digests[1], Some(digest(&data[4096..8192])));
        assert_eq!(digests[2], None, "short chunk: differs");
        assert_eq!(digests[3], None, "beyond the replica disk: differs");
        // The source disk ends mid-chunk: the last chunk is hashed to there.
        let Ok(Frame::Digests { digests, .. }) =
            answer(dir.path(), &request(DIGEST_VERSION, chunk, 6000, 1, 1))
        else {
            panic!("no digests");
        };
        assert_eq!(digests, vec![Some(digest(&data[4096..6000]))]);
        // A missing disk: every chunk differs.
        let Ok(Frame::Digests { digests, .. }) = answer(
            &dir.path().join("none"),
            &request(DIGEST_VERSION, chunk, 4 * chunk, 0, 2),
        ) else {
            panic!("no digests");
        };
        assert_eq!(digests, vec![None, None]);
        for bad in [
            request(DIGEST_VERSION + 1, chunk, 4 * chunk, 0, 1),
            request(DIGEST_VERSION, 1000, 4 * chunk, 0, 1),
            request(DIGEST_VERSION, 2 * MAX_DIGEST_CHUNK, 1 << 30, 0, 1),
            request(DIGEST_VERSION, chunk, 4 * chunk, 3, 2),
            request(DIGEST_VERSION, chunk, 4 * chunk, u64::MAX - 1, 1),
            request(DIGEST_VERSION, chunk, 1 << 40, 0, MAX_DIGEST_BATCH + 1),
            request(DIGEST_VERSION, chunk, 0, 0, 1),
        ] {
            assert!(answer(dir.path(), &bad).is_err(), "{bad:?} answered");
        }
    }
}
