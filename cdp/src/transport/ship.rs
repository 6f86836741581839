//! The shipper thread of a source process: sends sealed segments in order
//! to the replica and deletes each once the replica acknowledged it
//! (fsynced and applied).
//!
//! Resumable: on every (re)connect the replica's `Hello` says its last
//! applied segment; the shipper deletes everything up to it and continues
//! with the next. One segment is in flight at a time (the replica applies
//! whole segments in order anyway); optional zstd; a bandwidth cap
//! averaged over the connection; counters and a status file.
//!
//! Synchronous mode: each acknowledgement releases the guest completions
//! the segment carries ([`Journal::acknowledged`]); [`Shipper::watch_sync`]
//! opens the gate when the replica stops acknowledging for the timeout
//! and closes it again once the replica has caught up.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde::Serialize;

use super::tls::{client_config, TlsError, TlsFiles};
use super::wire::{Frame, WireError, FLAG_ZSTD};
use crate::journal::format::Segment;
use crate::journal::{now_ms, segment_path, Journal, Mode};

/// Errors of one shipping connection (the shipper logs them and retries).
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// Resolving or connecting failed.
    #[error("Cannot connect to replica {0}")]
    Connect(String, #[source] std::io::Error),
    /// TLS setup failed.
    #[error("TLS setup failed")]
    Tls(#[source] rustls::Error),
    /// Talking to the replica failed.
    #[error("Replica connection failed")]
    Wire(#[from] WireError),
    /// The replica answered something unexpected.
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// The replica refused a segment.
    #[error("Replica refused segment {seq}: {reason}")]
    Refused {
        /// Segment.
        seq: u64,
        /// The replica's reason.
        reason: String,
    },
    /// Reading or deleting a segment file failed.
    #[error("Cannot access segment {0}")]
    Segment(PathBuf, #[source] std::io::Error),
    /// Comparing chunk digests with the replica failed.
    #[error("Delta resync comparison failed")]
    Digest(#[from] super::digest::DigestError),
    /// The replica needs segments this journal no longer holds.
    #[error("Replica at segment {replica}, journal holds from {oldest}: re-seed the replica")]
    Behind {
        /// Replica's last applied.
        replica: u64,
        /// Oldest segment on disk.
        oldest: u64,
    },
}

/// Where and how to ship.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// Replica address (`host:port`).
    pub replica: String,
    /// Name the replica's certificate is issued for.
    pub server_name: String,
    /// TLS material.
    pub tls: TlsFiles,
    /// zstd level, or none.
    pub zstd_level: Option<i32>,
    /// Bandwidth cap in bytes per second (on the wire).
    pub max_bytes_per_sec: Option<u64>,
    /// JSON status file rewritten every second.
    pub status_file: Option<PathBuf>,
}

/// Shipper counters.
#[derive(Debug, Default)]
pub struct ShipCounters {
    /// Bytes sent (on the wire, after compression).
    pub bytes_sent: AtomicU64,
    /// Segment bytes before compression.
    pub bytes_raw: AtomicU64,
    /// Segments acknowledged.
    pub segments_acked: AtomicU64,
    /// Last acknowledged segment.
    pub last_acked_seq: AtomicU64,
    /// Cut time of the last acknowledged segment.
    pub last_acked_cut_ms: AtomicU64,
    /// Connected right now.
    pub connected: AtomicBool,
    /// Connection attempts that failed or ended.
    pub disconnects: AtomicU64,
    /// Segments the replica refused.
    pub refused: AtomicU64,
}

/// The status file's content.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    /// Group.
    pub group_id: u64,
    /// journal or dirty.
    pub mode: &'static str,
    /// Resync open.
    pub resyncing: bool,
    /// Chunks waiting for resync.
    pub dirty_chunks: u64,
    /// Cache bytes in use.
    pub cache_used: u64,
    /// Records journaled.
    pub records: u64,
    /// Last sealed segment.
    pub last_sealed_seq: u64,
    /// Last acknowledged segment.
    pub last_acked_seq: u64,
    /// Segments sealed but not acknowledged.
    pub pending_segments: u64,
    /// Seconds since the cut of the last acknowledged segment.
    pub lag_seconds: f64,
    /// Bytes on the wire.
    pub bytes_sent: u64,
    /// Segments acknowledged.
    pub segments_acked: u64,
    /// Connected to the replica.
    pub connected: bool,
    /// Disconnects.
    pub disconnects: u64,
    /// Refused segments.
    pub refused: u64,
    /// Chunks resent.
    pub resync_chunks: u64,
    /// Times the group fell back to the dirty bitmap.
    pub dirty_entries: u64,
    /// A full resync waits for the digest comparison with the replica.
    pub digest_pending: bool,
    /// Dirty chunks compared with the replica's digests.
    pub digest_compared: u64,
    /// Of those, chunks the replica already held (not resent).
    pub digest_equal: u64,
    /// Bytes not resent thanks to the comparison.
    pub digest_bytes_saved: u64,
    /// Bytes sent in each of the last 60 seconds, oldest first.
    pub rate_history: Vec<u64>,
    /// `async`; `sync` (writes complete once the replica has them) or
    /// `sync-fallback` (synchronous, but waiting for the replica to catch
    /// up: writes complete at once).
    pub replication: &'static str,
    /// Guest writes waiting for the replica's acknowledgement.
    pub held_writes: u64,
    /// Times synchronous mode fell back to asynchronous.
    pub sync_fallbacks: u64,
}

/// Running shipper.
pub struct Shipper {
    journal: Arc<Journal>,
    config: ShipConfig,
    tls: Arc<rustls::ClientConfig>,
    /// Counters.
    pub counters: Arc<ShipCounters>,
    history: Mutex<(u64, Vec<u64>)>,
    last_status: Mutex<Instant>,
}

const RETRY: Duration = Duration::from_secs(1);
/// How often the synchronous-mode watchdog looks.
const SYNC_WATCH: Duration = Duration::from_millis(50);
const POLL: Duration = Duration::from_millis(20);
/// A replica applying a large segment answers within this.
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// A replica that accepted the connection but does not greet (busy with
/// another source, or not a keel replica) is given up on after this, so a
/// stop never waits for `READ_TIMEOUT`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

impl Shipper {
    /// A shipper for `journal`.
    pub fn new(journal: Arc<Journal>, config: ShipConfig) -> Result<Arc<Self>, TlsError> {
        let tls = client_config(&config.tls)?;
        Ok(Arc::new(Self {
            journal,
            config,
            tls,
            counters: Arc::default(),
            history: Mutex::new((0, vec![0; 60])),
            last_status: Mutex::new(Instant::now()),
        }))
    }

    /// Ships until `stop` is set, reconnecting after errors.
    pub fn run(self: Arc<Self>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Acquire) {
            match self.connection(&stop) {
                Ok(()) => {}
                Err(e) => {
                    if let ShipError::Refused { .. }
                    | ShipError::Digest(
                        super::digest::DigestError::Invalid(_)
                        | super::digest::DigestError::Refused(_),
                    ) = e
                    {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(error = %e, "shipping interrupted; retrying");
                }
            }
            self.counters.connected.store(false, Ordering::Relaxed);
            self.counters.disconnects.fetch_add(1, Ordering::Relaxed);
            let until = Instant::now() + RETRY;
            while Instant::now() < until && !stop.load(Ordering::Acquire) {
                self.write_status();
                std::thread::sleep(POLL);
            }
        }
        self.write_status_now();
    }

    fn connection(&self, stop: &AtomicBool) -> Result<(), ShipError> {
        let cerr = |e| ShipError::Connect(self.config.replica.clone(), e);
        let addr = self
            .config
            .replica
            .to_socket_addrs()
            .map_err(cerr)?
            .next()
            .ok_or_else(|| cerr(std::io::Error::other("no address")))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(cerr)?;
        tcp.set_nodelay(true).map_err(cerr)?;
        tcp.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(cerr)?;
        let name = ServerName::try_from(self.config.server_name.clone())
            .map_err(|_| ShipError::Protocol("bad server name".into()))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name).map_err(ShipError::Tls)?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let Frame::Hello {
            group_id,
            last_seq,
            site_id,
            ..
        } = Frame::read_from(&mut s)?
        else {
            return Err(ShipError::Protocol("expected hello".into()));
        };
        s.sock.set_read_timeout(Some(READ_TIMEOUT)).map_err(cerr)?;
        let cfg = self.journal.config();
        if group_id != cfg.group_id || site_id != cfg.site_id {
            return Err(ShipError::Protocol(format!(
                "replica is for group {group_id} site {site_id}"
            )));
        }
        self.counters.connected.store(true, Ordering::Relaxed);
        tracing::info!(replica = %self.config.replica, last_seq, "connected to replica");
        self.forget_up_to(last_seq)?;
        let mut next = last_seq + 1;
        let started = Instant::now();
        let mut sent: u64 = 0;
        loop {
            self.write_status();
            let path = segment_path(&cfg.dir, next);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let sealed = self
                        .journal
                        .counters
                        .last_sealed_seq
                        .load(Ordering::Acquire);
                    // The writer renames before it counts the seal: a
                    // segment sealed since the read is there now.
                    if sealed >= next && !path.exists() {
                        return Err(ShipError::Behind {
                            replica: next - 1,
                            oldest: sealed,
                        });
                    }
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    // The replica holds every sealed segment: the moment to
                    // compare digests before a pending full resync.
                    if self.journal.resync_held() {
                        super::digest::pass(&self.journal, &mut s, stop)?;
                        continue;
                    }
                    self.journal.wait_sealed(next - 1, POLL);
                    continue;
                }
                Err(e) => return Err(ShipError::Segment(path, e)),
            };
            let cut_ms = Segment::verify(&bytes).map_or(0, |s| s.trailer.cut_ms);
            let (flags, payload) = match self.config.zstd_level {
                Some(level) => (
                    FLAG_ZSTD,
                    zstd::bulk::compress(&bytes, level)
                        .map_err(|e| ShipError::Segment(path.clone(), e))?,
                ),
                None => (0, bytes.clone()),
            };
            // Bandwidth cap: never ahead of cap × elapsed on this connection.
            if let Some(cap) = self.config.max_bytes_per_sec.filter(|&c| c > 0) {
                let due = Duration::from_secs_f64(sent as f64 / cap as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let wire_len = payload.len() as u64;
            Frame::Segment {
                seq: next,
                flags,
                bytes: payload,
            }
            .write_to(&mut s)?;
            sent += wire_len;
            self.counters
                .bytes_sent
                .fetch_add(wire_len, Ordering::Relaxed);
            self.counters
                .bytes_raw
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.add_history(wire_len);
            match Frame::read_from(&mut s)? {
                Frame::Ack { seq } if seq == next => {}
                Frame::Refuse { reason } => {
                    return Err(ShipError::Refused { seq: next, reason });
                }
                other => return Err(ShipError::Protocol(format!("unexpected {other:?}"))),
            }
            self.journal.acknowledged(next);
            std::fs::remove_file(&path).map_err(|e| ShipError::Segment(path.clone(), e))?;
            self.journal.release_cache(bytes.len() as u64);
            let c = &self.counters;
            c.segments_acked.fetch_add(1, Ordering::Relaxed);
            c.last_acked_seq.store(next, Ordering::Relaxed);
            c.last_acked_cut_ms.store(cut_ms, Ordering::Relaxed);
            next += 1;
        }
    }

    /// Deletes segments the replica already has (acknowledged before a
    /// crash or a lost ack).
    fn forget_up_to(&self, last_seq: u64) -> Result<(), ShipError> {
        let dir = &self.journal.config().dir;
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let seq = name
                .strip_prefix("seg-")
                .and_then(|r| r.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(seq) = seq.filter(|&s| s <= last_seq) {
                let len = e.metadata().map_or(0, |m| m.len());
                std::fs::remove_file(e.path()).map_err(|err| ShipError::Segment(e.path(), err))?;
                self.journal.release_cache(len);
                self.counters
                    .last_acked_seq
                    .fetch_max(seq, Ordering::Relaxed);
            }
        }
        self.journal.acknowledged(last_seq);
        Ok(())
    }

    /// Synchronous mode's watchdog (its own thread, until `stop`): opens
    /// the gate when held writes saw no acknowledgement for the timeout
    /// (the DR site is unreachable or too slow: guest I/O must not hang on
    /// it), closes it once the replica is consistent and at most one
    /// segment behind.
    pub fn watch_sync(&self, stop: &AtomicBool) {
        let Some(timeout) = self.journal.config().sync_timeout else {
            return;
        };
        let gate = self.journal.gate();
        let mut seen = (gate.released(), Instant::now());
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(SYNC_WATCH);
            if gate.is_open() {
                let sealed = self
                    .journal
                    .counters
                    .last_sealed_seq
                    .load(Ordering::Acquire);
                let acked = self.counters.last_acked_seq.load(Ordering::Acquire);
                if self.counters.connected.load(Ordering::Acquire)
                    && self.journal.mode() == Mode::Journal
                    && !self.journal.resyncing()
                    && self.journal.dirty_chunks() == 0
                    && sealed.saturating_sub(acked) <= 1
                {
                    self.journal.engage_sync();
                    seen = (gate.released(), Instant::now());
                }
                continue;
            }
            let released = gate.released();
            if gate.pending() == 0 || released != seen.0 {
                seen = (released, Instant::now());
            } else if seen.1.elapsed() >= timeout {
                self.journal.fall_back_to_async(&format!(
                    "no acknowledgement from the DR site for {} s",
                    timeout.as_secs()
                ));
            }
        }
    }

    fn add_history(&self, n: u64) {
        let sec = now_ms() / 1000;
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        advance(&mut h, sec);
        if let Some(last) = h.1.last_mut() {
            *last += n;
        }
    }

    fn write_status(&self) {
        {
            let mut last = self.last_status.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < Duration::from_secs(1) {
                return;
            }
            *last = Instant::now();
        }
        self.write_status_now();
    }

    /// The current status.
    pub fn status(&self) -> SourceStatus {
        let j = &self.journal;
        let c = &self.counters;
        let jc = &j.counters;
        let sealed = jc.last_sealed_seq.load(Ordering::Relaxed);
        let acked = c.last_acked_seq.load(Ordering::Relaxed);
        let cut = c.last_acked_cut_ms.load(Ordering::Relaxed);
        // Age of the newest cut the DR site has (RPO + transfer when
        // healthy; grows while the link is down).
        let lag = if cut > 0 {
            now_ms().saturating_sub(cut) as f64 / 1000.0
        } else {
            -1.0
        };
        let rate_history = {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            advance(&mut h, now_ms() / 1000);
            h.1.clone()
        };
        SourceStatus {
            group_id: j.config().group_id,
            mode: match j.mode() {
                Mode::Journal => "journal",
                Mode::Dirty => "dirty",
            },
            resyncing: j.resyncing(),
            dirty_chunks: j.dirty_chunks(),
            cache_used: j.cache_used(),
            records: jc.records.load(Ordering::Relaxed),
            last_sealed_seq: sealed,
            last_acked_seq: acked,
            pending_segments: sealed.saturating_sub(acked),
            lag_seconds: lag,
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            segments_acked: c.segments_acked.load(Ordering::Relaxed),
            connected: c.connected.load(Ordering::Relaxed),
            disconnects: c.disconnects.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            resync_chunks: jc.resync_chunks.load(Ordering::Relaxed),
            dirty_entries: jc.dirty_entries.load(Ordering::Relaxed),
            digest_pending: j.resync_held(),
            digest_compared: jc.digest_compared.load(Ordering::Relaxed),
            digest_equal: jc.digest_equal.load(Ordering::Relaxed),
            digest_bytes_saved: jc.digest_bytes_saved.load(Ordering::Relaxed),
            rate_history,
            replication: match (j.is_sync(), j.gate().is_open()) {
                (false, _) => "async",
                (true, false) => "sync",
                (true, true) => "sync-fallback",
            },
            held_writes: j.gate().pending(),
            sync_fallbacks: jc.sync_fallbacks.load(Ordering::Relaxed),
        }
    }

    fn write_status_now(&self) {
        let Some(path) = &self.config.status_file else {
            return;
        };
        if let Ok(b) = serde_json::to_vec_pretty(&self.status()) {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
}

/// Moves the per-second history window to second `sec`.
fn advance(h: &mut (u64, Vec<u64>), sec: u64) {
    let steps = sec.saturating_sub(h.0).min(60);
    for _ in 0..steps {
        h.1.remove(0);
        h.1.push(0);
    }
    h.0 = h.0.max(sec);
}
