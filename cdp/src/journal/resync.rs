//! The resync thread: leaves dirty mode when the cache has room again and
//! resends every dirty chunk, read from the source disk, into the journal.
//!
//! Ordering with concurrent guest writes (no lock held while reading):
//! clear the chunk's `touched` bit, read the chunk, then under the group
//! lock append it only if `touched` is still clear. A guest write to the
//! chunk sets `touched` under the same lock before it appends its own
//! record, so either the resync record goes first (and the write's record,
//! after it, wins on the replica) or the chunk is read again later.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::format::RecordKind;
use super::{Journal, Mode};

/// How often the resync thread looks for work.
const POLL: Duration = Duration::from_millis(50);

/// See the module docs.
pub struct Resync {
    journal: Arc<Journal>,
    disks: Vec<File>,
    scratch: Vec<u8>,
}

impl Resync {
    pub(crate) fn new(journal: Arc<Journal>, disks: Vec<File>) -> Self {
        let chunk = usize::try_from(journal.config.chunk_bytes).unwrap_or(64 << 10);
        Self {
            journal,
            disks,
            scratch: vec![0; chunk],
        }
    }

    /// Runs until the journal stops.
    pub fn run(mut self) {
        while !self.journal.stop.load(Ordering::Acquire) {
            self.resume_if_room();
            if self.journal.resyncing() && self.journal.mode() == Mode::Journal {
                self.pass();
            }
            std::thread::sleep(POLL);
        }
    }

    /// Dirty → journal once the cache is back under 3/4 of its limit and
    /// buffers are free; opens a resync.
    fn resume_if_room(&self) {
        let j = &self.journal;
        if j.mode() != Mode::Dirty || !j.cache_has_room(3, 4) || j.resync_held() {
            return;
        }
        let mut st = j.lock();
        if st.free.len() < 2 {
            return;
        }
        st.mode = Mode::Journal;
        if !st.resync_open {
            if j.append_locked(&mut st, RecordKind::ResyncBegin, 0, 0, 0, &[]) {
                st.resync_open = true;
                tracing::info!(
                    group = j.config.group_id,
                    dirty_chunks = j.dirty_chunks(),
                    "resync started"
                );
            }
        } else {
            tracing::info!(
                group = j.config.group_id,
                "journaling again, resync continues"
            );
        }
    }

    /// One pass over every dirty chunk; closes the resync when none is left.
    fn pass(&mut self) {
        let j = self.journal.clone();
        let chunk = j.config.chunk_bytes;
        for (d, file) in self.disks.iter().enumerate() {
            let (dirty, touched) = (&j.dirty[d], &j.touched[d]);
            let size = j.disks[d].size;
            let disk = u16::try_from(d).unwrap_or(u16::MAX);
            let mut next = dirty.next_set(0);
            while let Some(c) = next {
                if j.stop.load(Ordering::Acquire) {
                    return;
                }
                next = dirty.next_set(c + 1);
                if !dirty.take(c) {
                    continue;
                }
                touched.take(c);
                let offset = c * chunk;
                let len = chunk.min(size - offset);
                let buf = &mut self.scratch[..usize::try_from(len).unwrap_or(0)];
                if let Err(e) = file.read_exact_at(buf, offset) {
                    tracing::error!(error = %e, disk = d, offset, "resync read failed; will retry");
                    dirty.set(c);
                    return;
                }
                let zero = buf.iter().all(|&b| b == 0);
                let mut st = j.lock();
                if st.mode != Mode::Journal {
                    dirty.set(c);
                    return;
                }
                if touched.is_set(c) {
                    dirty.set(c); // written meanwhile: read it again
                    continue;
                }
                let ok = if zero {
                    j.append_locked(&mut st, RecordKind::ResyncZero, disk, offset, len, &[])
                } else {
                    j.append_locked(&mut st, RecordKind::ResyncData, disk, offset, len, buf)
                };
                if !ok {
                    dirty.set(c);
                    return;
                }
                j.counters.resync_chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut st = j.lock();
        if st.mode == Mode::Journal
            && st.resync_open
            && j.dirty_chunks() == 0
            && j.append_locked(&mut st, RecordKind::ResyncEnd, 0, 0, 0, &[])
        {
            st.resync_open = false;
            tracing::info!(
                group = j.config.group_id,
                "resync complete: replica consistent again"
            );
        }
    }
}
