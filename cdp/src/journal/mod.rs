//! The CDP journal of one consistency group: every completed guest write,
//! discard, write-zeroes and flush of the group's disks, in completion
//! order, in checksummed segment files on the cache directory.
//!
//! # Design
//! - [`CdpHook`] is the vhost-blk [`WriteHook`] of one disk of the group.
//!   On the worker thread it encodes the record straight into the group's
//!   pre-allocated active buffer ([`format::encode_record`]); a full buffer
//!   goes to the writer thread over a bounded channel and a free one from
//!   the pool takes its place. No syscall and no allocation per I/O; one
//!   uncontended mutex per I/O orders the records of all disks (and all
//!   queues) of the group into one history.
//! - [`writer`] appends buffers to `seg-<seq>.open`, and seals it every RPO
//!   period or at the size limit: trailer, fsync, rename to `.seg`, chain
//!   file. Segments are chained by checksum ([`format`]).
//! - **The crash-consistent cut.** Records enter the journal when the I/O
//!   completed and before the guest sees the completion. A write the guest
//!   issued after seeing another one complete therefore always follows it
//!   in the journal, so *every record boundary* is a state the source disk
//!   could have been in after a crash (writes in flight together may be
//!   cut apart, as a power loss would). A segment is cut at a record
//!   boundary: at the end of a buffer (size seal) or when the writer takes
//!   the active buffer under the lock (period seal). Flush records are kept
//!   so the replica knows which prefix the guest had made durable.
//! - **Synchronous mode** ([`JournalConfig::sync_timeout`]): each journaled
//!   guest record takes a ticket of the group's [`CompletionGate`] (under
//!   the same lock, so tickets follow journal order); the vhost worker
//!   holds the request's completion until the gate releases its ticket.
//!   The writer seals as soon as records wait (group commit: whatever
//!   arrived during the previous seal goes into the next segment) and
//!   notes each segment's last ticket; the shipper releases it when the
//!   replica acknowledged the segment (fsynced and applied). When the DR
//!   site does not acknowledge within the timeout, or the group falls
//!   back to the dirty bitmap, the gate opens (asynchronous, with a log
//!   line and a counter) until the replica has caught up again.
//! - **Cache full / buffers exhausted / link down too long**: the group
//!   switches to *dirty mode*: the hook only sets a bit per chunk in
//!   [`ChunkMap`]s (guest I/O never blocks or fails for replication).
//!   [`resync`] later resends those chunks read from the source disk,
//!   between `ResyncBegin` and `ResyncEnd` records; the replica is not at a
//!   crash-consistent point in between. A new group, and a restart after a
//!   crash (the in-memory buffers died with the process, and the source
//!   disk may hold completed writes the journal never got), start with a
//!   full resync.
//!
//! # Threading model
//! Worker threads (hook) → mutex-protected active buffer → bounded channel
//! → one writer thread; one resync thread; the shipper ([`crate::transport`])
//! reads sealed files and deletes them once the replica acknowledged them.
//!
//! # Assumptions
//! - Disks are served buffered (not O_DIRECT): resync reads the image
//!   through the page cache the vhost worker writes into.
//! - One process serves all disks of a group (`keel cdp source`).

pub mod chunkmap;
pub mod format;
pub mod resync;
pub mod writer;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use keel_vhost::{CompletionGate, WriteData, WriteHook};

pub use chunkmap::ChunkMap;
use format::{encode_record, record_len, DiskEntry, RecordKind};

/// Shortest and longest RPO period.
pub const RPO_MIN: Duration = Duration::from_secs(1);
/// See [`RPO_MIN`].
pub const RPO_MAX: Duration = Duration::from_secs(24 * 3600);
/// Default RPO period (the reference product's floor).
pub const RPO_DEFAULT: Duration = Duration::from_secs(30);
/// Shortest and longest synchronous-mode timeout.
pub const SYNC_TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// See [`SYNC_TIMEOUT_MIN`].
pub const SYNC_TIMEOUT_MAX: Duration = Duration::from_secs(300);

/// Errors of opening a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A configuration value is out of range.
    #[error("Invalid journal configuration: {0}")]
    Config(String),
    /// Creating or scanning the cache directory failed.
    #[error("Cannot use journal directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// Opening a source disk for resync reads failed.
    #[error("Cannot open source disk {0}")]
    OpenDisk(PathBuf, #[source] std::io::Error),
    /// Writing recovery state failed.
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// Starting a thread failed.
    #[error("Cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// How a group's journal is set up.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Cache directory (one per group).
    pub dir: PathBuf,
    /// Consistency group id.
    pub group_id: u64,
    /// Source site id.
    pub site_id: u64,
    /// The group's raw images, disk id = index.
    pub disks: Vec<PathBuf>,
    /// Seal period.
    pub rpo: Duration,
    /// Seal earlier when a segment reaches this size.
    pub max_segment_bytes: u64,
    /// Cache directory budget: sealed-but-unshipped segments plus buffers.
    pub cache_limit_bytes: u64,
    /// Size of one in-memory buffer.
    pub buffer_bytes: usize,
    /// Buffers in the pool.
    pub buffers: usize,
    /// Dirty-bitmap / resync granularity.
    pub chunk_bytes: u64,
    /// A full resync (new group, unclean stop) waits until the shipper
    /// compared chunk digests with the replica and cleared the chunks it
    /// already holds (`transport::digest`): set when a shipper runs.
    pub digest_before_resync: bool,
    /// Synchronous mode: guest writes complete only once the replica
    /// acknowledged them; after this long without an acknowledgement the
    /// group falls back to asynchronous. `None`: asynchronous.
    pub sync_timeout: Option<Duration>,
}

impl JournalConfig {
    /// Defaults: 30 s RPO, 64 MiB segments, 1 GiB cache, 8 × 4 MiB
    /// buffers, 64 KiB chunks.
    pub fn new(dir: impl Into<PathBuf>, group_id: u64, site_id: u64, disks: Vec<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            group_id,
            site_id,
            disks,
            rpo: RPO_DEFAULT,
            max_segment_bytes: 64 << 20,
            cache_limit_bytes: 1 << 30,
            buffer_bytes: 4 << 20,
            buffers: 8,
            chunk_bytes: 64 << 10,
            digest_before_resync: false,
            sync_timeout: None,
        }
    }

    fn pool_bytes(&self) -> u64 {
        (self.buffer_bytes as u64).saturating_mul(self.buffers as u64)
    }

    fn validate(&self) -> Result<(), JournalError> {
        let bad = |m: &str| Err(JournalError::Config(m.to_owned()));
        if !(RPO_MIN..=RPO_MAX).contains(&self.rpo) {
            return bad("RPO must be between 1 s and 24 h");
        }
        if self.disks.is_empty() || self.disks.len() > format::MAX_DISKS {
            return bad("a group has 1 to 64 disks");
        }
        if self.buffers < 2 || self.buffer_bytes < 64 << 10 {
            return bad("at least 2 buffers of at least 64 KiB");
        }
        if self.chunk_bytes < 4096
            || !self.chunk_bytes.is_power_of_two()
            || self.chunk_bytes + format::RECORD_HEADER_LEN as u64 > self.buffer_bytes as u64
        {
            return bad("chunk size must be a power of two ≥ 4 KiB and fit a buffer");
        }
        if self.cache_limit_bytes < 2 * self.pool_bytes() {
            return bad("cache limit must be at least twice the buffer pool");
        }
        if self
            .sync_timeout
            .is_some_and(|t| !(SYNC_TIMEOUT_MIN..=SYNC_TIMEOUT_MAX).contains(&t))
        {
            return bad("the synchronous-mode timeout must be between 1 s and 5 min");
        }
        Ok(())
    }
}

/// Replication mode of the group right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every write is journaled.
    Journal,
    /// Writes only mark the dirty bitmap (cache full or no buffer).
    Dirty,
}

/// State behind the group lock.
struct Active {
    mode: Mode,
    buf: Vec<u8>,
    free: Vec<Vec<u8>>,
    /// Between ResyncBegin and ResyncEnd (the replica is inconsistent).
    resync_open: bool,
    /// Guest records journaled since the last cut (synchronous mode).
    uncut: bool,
    /// The writer sleeps on `Journal::wake` (synchronous mode).
    writer_waiting: bool,
}

/// What the writer thread receives, in journal order.
pub(crate) enum ToWriter {
    /// A full buffer.
    Full(Vec<u8>),
    /// The active buffer taken for a seal; `ticket`: the gate's last
    /// ticket, every record up to it is in this or an earlier buffer.
    Cut {
        /// The buffer.
        buf: Vec<u8>,
        /// See above.
        ticket: u64,
    },
}

/// Counters of one group (read by the status writer).
#[derive(Debug, Default)]
pub struct JournalCounters {
    /// Records journaled.
    pub records: AtomicU64,
    /// Bytes journaled (records, encoded).
    pub bytes: AtomicU64,
    /// Times the group entered dirty mode.
    pub dirty_entries: AtomicU64,
    /// Chunks resent by resync.
    pub resync_chunks: AtomicU64,
    /// Segments sealed.
    pub segments_sealed: AtomicU64,
    /// Sequence number of the last sealed segment.
    pub last_sealed_seq: AtomicU64,
    /// Dirty chunks compared with the replica's digests.
    pub digest_compared: AtomicU64,
    /// Of those, chunks the replica already held (not resent).
    pub digest_equal: AtomicU64,
    /// Bytes of those chunks.
    pub digest_bytes_saved: AtomicU64,
    /// Digest passes cut short by a connection failure.
    pub digest_interrupted: AtomicU64,
    /// Times synchronous mode fell back to asynchronous.
    pub sync_fallbacks: AtomicU64,
}

/// The journal of one consistency group, shared by its hooks, writer,
/// resync and shipper threads.
pub struct Journal {
    config: JournalConfig,
    disks: Vec<DiskEntry>,
    active: Mutex<Active>,
    /// The writer waits here for records to cut (synchronous mode).
    wake: Condvar,
    full_tx: SyncSender<ToWriter>,
    /// Holds guest completions in synchronous mode (open otherwise).
    gate: CompletionGate,
    /// Sealed segments and their last gate ticket, oldest first, until
    /// the replica acknowledges them (synchronous mode).
    sealed_tickets: Mutex<VecDeque<(u64, u64)>>,
    /// The last sealed segment, for a shipper waiting for the next one.
    sealed: (Mutex<u64>, Condvar),
    /// Chunks to resend, per disk.
    dirty: Vec<ChunkMap>,
    /// Chunks written while a resync was open, per disk.
    touched: Vec<ChunkMap>,
    /// Bytes of segment files on the cache directory.
    cache_used: AtomicU64,
    stop: AtomicBool,
    /// The pending full resync waits for a digest comparison.
    resync_hold: AtomicBool,
    /// Counters.
    pub counters: JournalCounters,
}

/// Makes the next start of the journal in `dir` copy every disk in full:
/// for disks written while no journal saw it (served by something else
/// between two runs). Sequence numbers go on, so the replica accepts it.
pub fn require_full_resync(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(writer::CLEAN_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Running journal threads; [`JournalHandle::shutdown`] seals the last
/// segment and marks the journal clean.
pub struct JournalHandle {
    journal: Arc<Journal>,
    writer: Option<std::thread::JoinHandle<Result<(), writer::WriterError>>>,
    resync: Option<std::thread::JoinHandle<()>>,
}

impl Journal {
    /// Opens (or creates) the journal in `config.dir`, recovers it (torn
    /// and unsealed tails dropped, see [`writer::recover`]) and starts the
    /// writer and resync threads.
    pub fn start(config: JournalConfig) -> Result<(Arc<Journal>, JournalHandle), JournalError> {
        config.validate()?;
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| JournalError::Dir(config.dir.clone(), e))?;
        let mut disks = Vec::with_capacity(config.disks.len());
        let mut files = Vec::with_capacity(config.disks.len());
        for (i, p) in config.disks.iter().enumerate() {
            let f = std::fs::File::open(p).map_err(|e| JournalError::OpenDisk(p.clone(), e))?;
            let len = f
                .metadata()
                .map_err(|e| JournalError::OpenDisk(p.clone(), e))?
                .len();
            disks.push(DiskEntry {
                id: u16::try_from(i).map_err(|_| JournalError::Config("too many disks".into()))?,
                size: len - len % 512,
            });
            files.push(f);
        }
        let recovered = writer::recover(&config.dir)?;
        // Room for every buffer of the pool plus one cut.
        let (full_tx, full_rx): (SyncSender<ToWriter>, Receiver<ToWriter>) =
            std::sync::mpsc::sync_channel(config.buffers + 1);
        let free = (0..config.buffers)
            .map(|_| Vec::with_capacity(config.buffer_bytes))
            .collect();
        let journal = Arc::new(Journal {
            dirty: disks
                .iter()
                .map(|d| ChunkMap::new(d.size, config.chunk_bytes))
                .collect(),
            touched: disks
                .iter()
                .map(|d| ChunkMap::new(d.size, config.chunk_bytes))
                .collect(),
            disks,
            active: Mutex::new(Active {
                mode: Mode::Journal,
                buf: Vec::new(),
                free,
                resync_open: false,
                uncut: false,
                writer_waiting: false,
            }),
            wake: Condvar::new(),
            full_tx,
            // Open until the shipper sees the replica caught up.
            gate: CompletionGate::new(true),
            sealed_tickets: Mutex::new(VecDeque::new()),
            sealed: (Mutex::new(recovered.chain.seq), Condvar::new()),
            cache_used: AtomicU64::new(recovered.cache_bytes),
            stop: AtomicBool::new(false),
            resync_hold: AtomicBool::new(false),
            counters: JournalCounters::default(),
            config,
        });
        journal
            .counters
            .last_sealed_seq
            .store(recovered.chain.seq, Ordering::Relaxed);
        if !recovered.clean {
            tracing::warn!(
                group = journal.config.group_id,
                "journal not shut down cleanly (or new): full resync of every disk"
            );
            for d in &journal.dirty {
                d.set_all();
            }
            journal.lock().mode = Mode::Dirty;
            // Before any hook exists: nothing is journaled until the hold
            // ends, so the replica is at the journal's end when compared.
            if journal.config.digest_before_resync {
                journal.resync_hold.store(true, Ordering::SeqCst);
            }
        }
        let w = writer::Writer::new(journal.clone(), full_rx, recovered.chain);
        let writer = std::thread::Builder::new()
            .name("cdp-writer".into())
            .spawn(move || w.run())
            .map_err(|e| JournalError::Thread("writer", e))?;
        let r = resync::Resync::new(journal.clone(), files);
        let resync = std::thread::Builder::new()
            .name("cdp-resync".into())
            .spawn(move || r.run())
            .map_err(|e| JournalError::Thread("resync", e))?;
        Ok((
            journal.clone(),
            JournalHandle {
                journal,
                writer: Some(writer),
                resync: Some(resync),
            },
        ))
    }

    /// The hook of disk `disk` (its index in [`JournalConfig::disks`]).
    pub fn hook(self: &Arc<Self>, disk: u16) -> CdpHook {
        CdpHook {
            journal: self.clone(),
            disk,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &JournalConfig {
        &self.config
    }

    /// The disk table written into every segment header.
    pub fn disks(&self) -> &[DiskEntry] {
        &self.disks
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// Whether a resync is open (replica not consistent until it ends).
    pub fn resyncing(&self) -> bool {
        self.lock().resync_open
    }

    /// Whether the pending full resync waits for a digest comparison
    /// (the group is in dirty mode and journals nothing meanwhile).
    pub fn resync_held(&self) -> bool {
        self.resync_hold.load(Ordering::SeqCst)
    }

    /// Ends the hold: the resync thread may open the resync.
    pub fn release_resync_hold(&self) {
        self.resync_hold.store(false, Ordering::SeqCst);
    }

    /// The dirty map of disk `disk`.
    pub(crate) fn dirty_map(&self, disk: usize) -> Option<&ChunkMap> {
        self.dirty.get(disk)
    }

    /// Chunks waiting for resync, all disks.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty.iter().map(ChunkMap::count).sum()
    }

    /// Bytes of segment files on the cache directory.
    pub fn cache_used(&self) -> u64 {
        self.cache_used.load(Ordering::Acquire)
    }

    /// The shipper deleted an acknowledged segment of `bytes` bytes.
    pub fn release_cache(&self, bytes: u64) {
        let _ = self
            .cache_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(bytes))
            });
    }

    fn lock(&self) -> MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the cache has room for every buffer in the pool on top of
    /// what is already on disk.
    fn cache_has_room(&self, fraction_num: u64, fraction_den: u64) -> bool {
        self.cache_used()
            .saturating_add(self.config.pool_bytes())
            .saturating_mul(fraction_den)
            <= self.config.cache_limit_bytes.saturating_mul(fraction_num)
    }

    /// hot path: makes room for `need` bytes in the active buffer; false
    /// (and dirty mode) when no free buffer or no cache space.
    #[inline]
    fn ensure_room(&self, st: &mut Active, need: usize) -> bool {
        if st.buf.capacity() - st.buf.len() >= need {
            return true;
        }
        if need > self.config.buffer_bytes || !self.cache_has_room(1, 1) {
            self.enter_dirty(st);
            return false;
        }
        let Some(fresh) = st.free.pop() else {
            self.enter_dirty(st);
            return false;
        };
        let full = std::mem::replace(&mut st.buf, fresh);
        if full.capacity() > 0 {
            if let Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) =
                self.full_tx.try_send(ToWriter::Full(full))
            {
                // Cannot happen (the channel holds the whole pool); keep
                // the buffer rather than lose its records.
                let (ToWriter::Full(b) | ToWriter::Cut { buf: b, .. }) = m;
                st.free.push(std::mem::replace(&mut st.buf, b));
                self.enter_dirty(st);
                return false;
            }
        }
        true
    }

    fn enter_dirty(&self, st: &mut Active) {
        if st.mode != Mode::Dirty {
            st.mode = Mode::Dirty;
            self.counters.dirty_entries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                group = self.config.group_id,
                cache_used = self.cache_used(),
                "journal full or out of buffers: tracking writes in the dirty bitmap"
            );
            // Writes that are not journaled cannot wait for the replica.
            self.fall_back_to_async("the journal fell back to the dirty bitmap");
        }
    }

    /// The gate synchronous mode holds completions with.
    pub fn gate(&self) -> &CompletionGate {
        &self.gate
    }

    /// Whether the group is configured synchronous.
    pub fn is_sync(&self) -> bool {
        self.config.sync_timeout.is_some()
    }

    /// Synchronous mode gives up waiting for the replica (completions go
    /// at once) until [`Journal::engage_sync`].
    pub fn fall_back_to_async(&self, why: &str) {
        if self.is_sync() && !self.gate.is_open() {
            self.gate.set_open(true);
            self.counters.sync_fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                group = self.config.group_id,
                reason = why,
                "synchronous replication fell back to asynchronous"
            );
        }
    }

    /// Synchronous mode holds completions again (the replica has caught
    /// up: everything sealed is acknowledged).
    pub fn engage_sync(&self) {
        if self.is_sync() && self.gate.is_open() {
            self.gate.set_open(false);
            tracing::info!(
                group = self.config.group_id,
                "synchronous replication engaged: writes complete once the DR site has them"
            );
        }
    }

    /// The replica acknowledged every segment up to `seq`: releases the
    /// completions they carry.
    pub fn acknowledged(&self, seq: u64) {
        let mut t = self
            .sealed_tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut ticket = None;
        while let Some(&(s, tk)) = t.front() {
            if s > seq {
                break;
            }
            ticket = Some(tk);
            t.pop_front();
        }
        drop(t);
        if let Some(tk) = ticket {
            self.gate.release(tk);
        }
    }

    /// Waits up to `timeout` for a segment after `seq` to be sealed.
    pub fn wait_sealed(&self, seq: u64, timeout: Duration) {
        let (m, cv) = &self.sealed;
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        if *g <= seq {
            let _ = cv.wait_timeout(g, timeout);
        }
    }

    /// The writer sealed `seq`, whose last record has gate ticket `ticket`.
    fn note_sealed(&self, seq: u64, ticket: Option<u64>) {
        if let (Some(tk), true) = (ticket, self.is_sync()) {
            self.sealed_tickets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back((seq, tk));
        }
        let (m, cv) = &self.sealed;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = seq;
        cv.notify_all();
    }

    /// hot path: journals one record of disk `disk`, or marks its range
    /// dirty when the group is in dirty mode. `fill` writes the `data_len`
    /// payload bytes.
    #[inline]
    fn append(
        &self,
        kind: RecordKind,
        disk: u16,
        offset: u64,
        len: u64,
        data_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let Some(dmap) = self.dirty.get(usize::from(disk)) else {
            return;
        };
        let mut st = self.lock();
        if st.mode == Mode::Journal && self.ensure_room(&mut st, record_len(data_len)) {
            if st.resync_open {
                if let Some(t) = self.touched.get(usize::from(disk)) {
                    t.set_range(offset, len);
                }
            }
            encode_record(&mut st.buf, kind, disk, offset, len, data_len, fill);
            self.counters.records.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(record_len(data_len) as u64, Ordering::Relaxed);
            if self.is_sync() {
                self.gate.issue();
                st.uncut = true;
                if st.writer_waiting {
                    // A futex wake only when the writer sleeps: a busy
                    // writer cuts these records with its next seal.
                    st.writer_waiting = false;
                    self.wake.notify_one();
                }
            }
        } else if kind != RecordKind::Flush {
            dmap.set_range(offset, len);
        }
    }

    /// Journals a write of `data` at `offset` of disk `disk` exactly as the
    /// hook does for a guest write (for callers that write the disk
    /// themselves, and for tests and benchmarks).
    pub fn record_write(&self, disk: u16, offset: u64, data: &[u8]) {
        self.append(
            RecordKind::Write,
            disk,
            offset,
            data.len() as u64,
            data.len(),
            |out| out.copy_from_slice(data),
        );
    }

    /// Journals a flush barrier (see [`Journal::record_write`]).
    pub fn record_flush(&self) {
        self.append(RecordKind::Flush, 0, 0, 0, 0, |_| {});
    }

    /// Appends a marker or resync record under the caller's lock; false
    /// when no room (the group is then in dirty mode).
    fn append_locked(
        &self,
        st: &mut Active,
        kind: RecordKind,
        disk: u16,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> bool {
        if !self.ensure_room(st, record_len(data.len())) {
            return false;
        }
        encode_record(&mut st.buf, kind, disk, offset, len, data.len(), |out| {
            out.copy_from_slice(data)
        });
        self.counters.records.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The writer returns a written buffer to the pool.
    fn recycle(&self, mut buf: Vec<u8>) {
        buf.clear();
        self.lock().free.push(buf);
    }

    /// The writer cuts the journal for a seal: the active buffer goes into
    /// the channel behind every full buffer queued before it (under the
    /// lock, so no record that follows it can be written before it).
    /// False when the channel refused it (cannot happen, see `start`).
    fn cut(&self) -> bool {
        let mut st = self.lock();
        let buf = std::mem::take(&mut st.buf);
        st.uncut = false;
        let ticket = self.gate.issued();
        match self.full_tx.try_send(ToWriter::Cut { buf, ticket }) {
            Ok(()) => true,
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => {
                let (ToWriter::Full(b) | ToWriter::Cut { buf: b, .. }) = m;
                st.buf = b;
                false
            }
        }
    }

    /// Synchronous mode: the writer sleeps until records wait to be cut,
    /// or `timeout`. True when records wait.
    fn wait_uncut(&self, timeout: Duration) -> bool {
        let mut st = self.lock();
        if !st.uncut {
            st.writer_waiting = true;
            st = self
                .wake
                .wait_timeout(st, timeout)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
            st.writer_waiting = false;
        }
        st.uncut
    }
}

impl JournalHandle {
    /// The journal.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Stops the threads: call after the disks stopped serving. Seals what
    /// is buffered and, when nothing is left dirty, marks the journal clean
    /// (the next start resumes without a full resync).
    pub fn shutdown(mut self) -> Result<(), writer::WriterError> {
        self.stop_threads()
    }

    fn stop_threads(&mut self) -> Result<(), writer::WriterError> {
        self.journal.stop.store(true, Ordering::Release);
        if let Some(r) = self.resync.take() {
            let _ = r.join();
        }
        match self.writer.take() {
            Some(w) => w.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for JournalHandle {
    fn drop(&mut self) {
        let _ = self.stop_threads();
    }
}

/// The [`WriteHook`] of one disk of a group: journals its completed writes.
#[derive(Clone)]
pub struct CdpHook {
    journal: Arc<Journal>,
    disk: u16,
}

impl WriteHook for CdpHook {
    fn on_write(&self, offset: u64, len: u64, data: &WriteData<'_>) {
        let data_len = usize::try_from(len).unwrap_or(0).min(data.len());
        self.journal.append(
            RecordKind::Write,
            self.disk,
            offset,
            data_len as u64,
            data_len,
            |out| {
                data.copy_to(out);
            },
        );
    }
    fn on_discard(&self, offset: u64, len: u64) {
        self.journal
            .append(RecordKind::Discard, self.disk, offset, len, 0, |_| {});
    }
    fn on_write_zeroes(&self, offset: u64, len: u64) {
        self.journal
            .append(RecordKind::WriteZeroes, self.disk, offset, len, 0, |_| {});
    }
    fn on_flush(&self) {
        self.journal
            .append(RecordKind::Flush, self.disk, 0, 0, 0, |_| {});
    }
    fn gate(&self) -> Option<&CompletionGate> {
        self.journal.is_sync().then_some(&self.journal.gate)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Path of segment `seq` in `dir` (sealed).
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:016}.seg"))
}
