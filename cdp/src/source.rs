//! `keel cdp source`: one process serving every disk of a consistency
//! group as vhost-user-blk, with the group's journal hooked into each
//! disk's write path and the shipper sending sealed segments to the
//! replica. One process per group is what gives the group's disks one
//! write order (one journal, one lock).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_vhost::{
    cbt_path, serve, Cbt, DiskOptions, DiskShared, QueueConfig, RawDisk, ServeConfig, StopHandle,
};

use crate::journal::{Journal, JournalConfig, JournalError};
use crate::transport::ship::{ShipConfig, ShipCounters, Shipper};
use crate::transport::tls::TlsError;

/// One disk of the group.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Raw image.
    pub image: PathBuf,
    /// GET_ID answer; the image's file stem when absent. The host agent
    /// passes the serial the disk had under `keel vhost-blk`, so a guest
    /// sees the same disk when protection starts or stops.
    pub serial: Option<String>,
}

/// Everything `keel cdp source` needs.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Disks, disk id = index.
    pub disks: Vec<SourceDisk>,
    /// Queues per disk.
    pub queues: u16,
    /// Journal settings (its `disks` are filled from `disks`).
    pub journal: JournalConfig,
    /// Where to ship; journal only when absent.
    pub ship: Option<ShipConfig>,
    /// Also track changed blocks for backups (bitmaps next to each image,
    /// as `keel vhost-blk --cbt-granularity` keeps them): a disk served by
    /// CDP for a while must not leave its backup bitmaps silently stale.
    pub cbt_granularity: Option<u64>,
}

/// Errors of the source process.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Opening a disk failed.
    #[error("Cannot open disk")]
    OpenDisk(#[source] keel_vhost::DiskError),
    /// The journal could not start.
    #[error("Cannot start the journal")]
    Journal(#[source] JournalError),
    /// TLS setup failed.
    #[error("Cannot set up TLS")]
    Tls(#[source] TlsError),
    /// Opening or saving a disk's changed-block bitmaps failed.
    #[error("Changed-block tracking of {0} failed")]
    Cbt(PathBuf, #[source] keel_vhost::CbtError),
    /// Serving a disk failed.
    #[error("Serving disk {0} failed")]
    Serve(PathBuf, #[source] keel_vhost::ServeError),
    /// The journal writer failed.
    #[error("Journal writer failed")]
    Writer(#[source] crate::journal::writer::WriterError),
    /// A thread could not start or panicked.
    #[error("Thread {0} failed")]
    Thread(&'static str),
    /// Synchronous mode needs a replica to wait for.
    #[error("Synchronous mode needs a replica address")]
    SyncWithoutReplica,
}

/// Serves the group until `stop` is stopped; then seals the journal.
pub fn run(config: SourceConfig, stop: &StopHandle) -> Result<(), SourceError> {
    if config.journal.sync_timeout.is_some() && config.ship.is_none() {
        return Err(SourceError::SyncWithoutReplica);
    }
    let mut jc = config.journal.clone();
    jc.disks = config.disks.iter().map(|d| d.image.clone()).collect();
    // A shipper compares digests with the replica before a full resync.
    jc.digest_before_resync |= config.ship.is_some();
    let mut shared = Vec::new();
    let mut cbts = Vec::new();
    for d in &config.disks {
        let disk = RawDisk::open(DiskOptions::new(&d.image)).map_err(SourceError::OpenDisk)?;
        let serial = d.serial.clone().unwrap_or_else(|| {
            d.image
                .file_stem()
                .map_or_else(|| "keel-cdp".into(), |s| s.to_string_lossy().into_owned())
        });
        let cbt = match config.cbt_granularity {
            Some(gran) => Some(Arc::new(
                Cbt::open(&cbt_path(&d.image), disk.capacity(), gran)
                    .map_err(|e| SourceError::Cbt(d.image.clone(), e))?,
            )),
            None => None,
        };
        cbts.push(cbt);
        shared.push(Arc::new(DiskShared::new(disk, &serial)));
    }
    let (journal, handle) = Journal::start(jc).map_err(SourceError::Journal)?;
    let ship_stop = Arc::new(AtomicBool::new(false));
    let shipper = match &config.ship {
        Some(sc) => {
            let s = Shipper::new(journal.clone(), sc.clone()).map_err(SourceError::Tls)?;
            let counters = s.counters.clone();
            let (st, watch, watch_stop) = (ship_stop.clone(), s.clone(), ship_stop.clone());
            // Synchronous mode's watchdog; returns at once when async.
            let watchdog = std::thread::Builder::new()
                .name("cdp-sync".into())
                .spawn(move || watch.watch_sync(&watch_stop))
                .map_err(|_| SourceError::Thread("sync watchdog"))?;
            Some((
                std::thread::Builder::new()
                    .name("cdp-ship".into())
                    .spawn(move || s.run(st))
                    .map_err(|_| SourceError::Thread("ship"))?,
                watchdog,
                counters,
            ))
        }
        None => None,
    };
    let mut servers = Vec::new();
    for (i, ((d, sh), cbt)) in config
        .disks
        .iter()
        .zip(shared)
        .zip(cbts.clone())
        .enumerate()
    {
        let hook =
            journal.hook(u16::try_from(i).map_err(|_| SourceError::Thread("too many disks"))?);
        let sc = ServeConfig {
            socket: d.socket.clone(),
            queues: QueueConfig::new(config.queues),
        };
        let stop = stop.clone();
        let image = d.image.clone();
        servers.push(
            std::thread::Builder::new()
                .name(format!("cdp-disk-{i}"))
                .spawn(move || {
                    match cbt {
                        Some(cbt) => serve(&sc, sh, (hook, cbt), &stop),
                        None => serve(&sc, sh, hook, &stop),
                    }
                    .map_err(|e| SourceError::Serve(image, e))
                })
                .map_err(|_| SourceError::Thread("disk"))?,
        );
    }
    tracing::info!(
        group = journal.config().group_id,
        disks = servers.len(),
        "serving CDP group"
    );
    let mut result = Ok(());
    for s in servers {
        let r = s.join().unwrap_or(Err(SourceError::Thread("disk")));
        if r.is_err() && result.is_ok() {
            result = r;
            stop.stop();
        }
    }
    // Only a clean stop marks the bitmaps valid (as `keel vhost-blk`).
    if result.is_ok() {
        for (d, cbt) in config.disks.iter().zip(&cbts) {
            if let Some(cbt) = cbt {
                if let Err(e) = cbt.persist_clean() {
                    result = Err(SourceError::Cbt(d.image.clone(), e));
                }
            }
        }
    }
    let sealed = handle.shutdown().map_err(SourceError::Writer);
    if let Some((s, watchdog, counters)) = shipper {
        drain(&journal, &counters);
        ship_stop.store(true, Ordering::Release);
        let _ = s.join();
        let _ = watchdog.join();
    }
    result.and(sealed)
}

/// A stop ships what the journal sealed before it returns (bounded by
/// [`DRAIN`]): stop-then-failover is a planned switchover that loses
/// nothing while the replica is reachable.
fn drain(journal: &Journal, counters: &ShipCounters) {
    let sealed = journal.counters.last_sealed_seq.load(Ordering::Acquire);
    let start = Instant::now();
    while counters.last_acked_seq.load(Ordering::Acquire) < sealed {
        if start.elapsed() > DRAIN {
            tracing::warn!(
                sealed,
                acked = counters.last_acked_seq.load(Ordering::Acquire),
                "stopping with segments the replica has not acknowledged"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(sealed, "every sealed segment acknowledged by the replica");
}

/// How long a stop waits for the replica to acknowledge the last segments.
const DRAIN: Duration = Duration::from_secs(30);
