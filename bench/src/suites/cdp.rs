//! `cdp`: what continuous data protection costs the write path, and
//! whether the DR side keeps up, in one process on the same files:
//!
//! - 4 KiB writes at QD1 to the raw image with the CDP journal capturing
//!   each one (the work `keel cdp source`'s write hook adds) vs the same
//!   writes alone: IOPS kept, and the latency added per write;
//! - the initial full copy (resync) captured into the journal;
//! - the replica applying the sealed segments (whole segments, undo logs
//!   kept) vs the rate the writes were captured at (goal ≥ 2×);
//! - shipping the segments over mutual TLS on loopback to a replica that
//!   applies them, vs the capture rate;
//! - the link the capacity formula asks for at the measured cache speed;
//! - the resync of a 256 MiB disk the replica already holds but for 1 % of
//!   its chunks (a restart after a crash, a reprotect): with the digest
//!   comparison vs copying every chunk, time and bytes on the wire;
//! - synchronous mode (RPO 0): a QD1 write until the replica acknowledged
//!   it, against a plain TCP round trip on the same loopback (the link's
//!   share of the cost; the rest is sealing, TLS and the replica's apply).
//!
//! Writes land in the page cache (no O_DIRECT, no fsync per write) for
//! keel and peer alike, so the ratio is the capture's share of a cheap
//! write: a real disk write makes the added microseconds a smaller share.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_cdp::journal::{segment_path, Journal, JournalConfig, Mode};
use keel_cdp::replica::{self, Replica};
use keel_cdp::transport::ship::{ShipConfig, Shipper};
use keel_cdp::transport::tls::generate_pki;

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "cdp",
    about: "CDP journal capture cost, replica apply and TLS shipping rates",
    run,
};

const GROUP: u64 = 7;
const SITE: u64 = 1;
const BLOCK: usize = 4096;
/// Waiting longer than this for the journal or the replica is a failure.
const PATIENCE: Duration = Duration::from_secs(300);

fn err(e: impl std::error::Error + Send + Sync + 'static) -> BenchError {
    BenchError::Io(std::io::Error::other(e))
}

fn wait(what: &str, mut done: impl FnMut() -> bool) -> Result<(), BenchError> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > PATIENCE {
            return Err(BenchError::Io(std::io::Error::other(format!(
                "timed out waiting for {what}"
            ))));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A pseudo-random block offset sequence (xorshift), the same for keel
/// and peer.
fn offsets(blocks: u64, n: usize) -> Vec<u64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * BLOCK as u64
        })
        .collect()
}

fn journal_config(dir: &Path, image: &Path, cache: u64) -> JournalConfig {
    let mut c = JournalConfig::new(dir, GROUP, SITE, vec![image.to_owned()]);
    c.rpo = Duration::from_secs(1);
    c.cache_limit_bytes = cache;
    c
}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    let (size, writes): (u64, usize) = match scale {
        Scale::Quick => (64 << 20, 16_384),
        Scale::Full => (512 << 20, 131_072),
    };
    let base = std::env::var_os("KEEL_BENCH_DIR")
        .map_or_else(|| std::path::PathBuf::from("."), std::path::PathBuf::from);
    let scratch = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in(base)?;
    let dir = scratch.path();
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0x5Au8; usize::try_from(size).unwrap_or(0)])?;
    let file = std::fs::OpenOptions::new().write(true).open(&image)?;
    let blocks = size / BLOCK as u64;
    let order = offsets(blocks, writes);
    let data = vec![0xC3u8; BLOCK];
    let mb_written = (writes * BLOCK) as f64 / 1e6;
    let mut out = Vec::new();

    // Initial full copy into the journal (a new group resyncs).
    let cache = 4 * size + 2 * (writes * BLOCK) as u64;
    let t = Instant::now();
    let (journal, handle) =
        Journal::start(journal_config(&dir.join("journal"), &image, cache)).map_err(err)?;
    wait("the initial resync", || {
        journal.mode() == Mode::Journal && !journal.resyncing() && journal.dirty_chunks() == 0
    })?;
    let resync_s = t.elapsed().as_secs_f64();
    out.push(Measurement::new(
        "initial full copy captured into the journal",
        "MB/s",
        true,
        size as f64 / 1e6 / resync_s,
    ));

    // QD1 writes: peer (write alone) first, then with the capture.
    let t = Instant::now();
    for &off in &order {
        file.write_all_at(&data, off)?;
    }
    let peer_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for &off in &order {
        file.write_all_at(&data, off)?;
        journal.record_write(0, off, &data);
    }
    let keel_s = t.elapsed().as_secs_f64();
    journal.record_flush();
    let n = writes as f64;
    out.push(
        Measurement::new(
            "4 KiB random writes QD1 + CDP journal capture",
            "IOPS",
            true,
            n / keel_s,
        )
        .with_peer("the same writes without CDP", n / peer_s),
    );
    out.push(Measurement::new(
        "latency the capture adds per 4 KiB write",
        "µs",
        false,
        (keel_s - peer_s).max(0.0) / n * 1e6,
    ));
    let capture_mb_s = mb_written / keel_s;
    // A writer starved by a loaded machine can leave the burst partly in
    // the dirty bitmap: the resync completes it before the replica is
    // compared with the source.
    wait("the journal to catch up", || {
        journal.mode() == Mode::Journal && !journal.resyncing() && journal.dirty_chunks() == 0
    })?;
    handle.shutdown().map_err(err)?;
    let sealed = journal.counters.last_sealed_seq.load(Ordering::Acquire);

    // The replica applies every sealed segment, as received.
    let mut segments = Vec::new();
    let mut segment_bytes = 0u64;
    for seq in 1..=sealed {
        let bytes = std::fs::read(segment_path(&journal.config().dir, seq))?;
        segment_bytes += bytes.len() as u64;
        segments.push(bytes);
    }
    let mut r = Replica::open(&dir.join("replica"), GROUP, SITE, 16).map_err(err)?;
    let t = Instant::now();
    for s in &segments {
        r.receive(s).map_err(err)?;
    }
    let apply_s = t.elapsed().as_secs_f64();
    if std::fs::read(&image)? != std::fs::read(r.disk_path(0))? {
        return Err(BenchError::Io(std::io::Error::other(
            "the replica differs from the source after applying every segment",
        )));
    }
    out.push(
        Measurement::new(
            "replica apply (whole segments, undo logs kept)",
            "MB/s",
            true,
            segment_bytes as f64 / 1e6 / apply_s,
        )
        .with_peer("capture rate of the QD1 writes", capture_mb_s),
    );
    drop(segments);

    // Shipping over mutual TLS on loopback into a replica server.
    let (ship_mb_s, lag_s) = ship(dir, &image, &file, &order, &data)?;
    out.push(
        Measurement::new(
            "capture + ship over mutual TLS (loopback) + apply",
            "MB/s",
            true,
            ship_mb_s,
        )
        .with_peer("capture rate of the QD1 writes", capture_mb_s),
    );
    out.push(Measurement::new(
        "RPO 1 s: last write until the replica acknowledged it",
        "s",
        false,
        lag_s,
    ));

    let (sync_us, rtt_us) = sync_qd1(dir, &image, &file, &order[..order.len() / 16], &data)?;
    out.push(
        Measurement::new(
            "sync mode: 4 KiB QD1 write until the replica acknowledged it",
            "µs",
            false,
            sync_us,
        )
        .with_peer("TCP round trip on the same loopback", rtt_us),
    );

    // The capacity formula at the measured cache speed, for a guest
    // writing 20 MB/s steadily (SUM grows with the RPO, so the link it
    // needs is the same for every RPO the cache can absorb).
    let z = keel_cdp::capacity::required_mbit_s(20.0 * 5.0, 5.0, capture_mb_s).map_err(err)?;
    out.push(Measurement::new(
        "link for 20 MB/s of writes, RPO 5 s (Z = 1.2·SUM·8/(RPO−SUM/Y), Y measured)",
        "Mbit/s",
        false,
        z,
    ));

    // Resync of a disk the replica holds but for 1 % of its chunks.
    let (delta_s, delta_bytes) = delta_resync(dir, true)?;
    let (full_s, full_bytes) = delta_resync(dir, false)?;
    out.push(
        Measurement::new(
            "resync 256 MiB, replica differs in 1 % of chunks: digest comparison",
            "s",
            false,
            delta_s,
        )
        .with_peer("copying every chunk", full_s),
    );
    out.push(
        Measurement::new(
            "resync 256 MiB, 1 % differing: bytes on the wire",
            "MB",
            false,
            delta_bytes as f64 / 1e6,
        )
        .with_peer("copying every chunk", full_bytes as f64 / 1e6),
    );
    Ok(out)
}

/// A new group on a 256 MiB disk whose replica directory already holds
/// the disk but for 1 % of its 64 KiB chunks (every 100th); returns the
/// seconds until the replica acknowledged the end of the resync and the
/// bytes shipped.
fn delta_resync(dir: &Path, digest: bool) -> Result<(f64, u64), BenchError> {
    const SIZE: u64 = 256 << 20;
    const CHUNK: u64 = 64 << 10;
    let name = if digest {
        "resync-delta"
    } else {
        "resync-full"
    };
    let base = dir.join(name);
    let rdir = base.join("replica");
    std::fs::create_dir_all(&rdir)?;
    let image = base.join("disk.raw");
    let mut data: Vec<u8> = (0..SIZE)
        .map(|i| u8::try_from((i / 4096) % 251).unwrap_or(0))
        .collect();
    std::fs::write(&image, &data)?;
    for c in (0..SIZE / CHUNK).step_by(100) {
        data[usize::try_from(c * CHUNK + 17).unwrap_or(0)] ^= 0xFF;
    }
    std::fs::write(rdir.join("disk-0.raw"), &data)?;
    drop(data);
    let group = GROUP + 3;
    let (tls, listen, rstop, server) = replica_server(&base, "replica", group)?;
    let mut config = journal_config(&base.join("journal"), &image, 2 * SIZE);
    config.group_id = group;
    config.digest_before_resync = digest;
    let t = Instant::now();
    let (journal, handle) = Journal::start(config).map_err(err)?;
    let shipper = Shipper::new(journal.clone(), ship_config(listen, tls)).map_err(err)?;
    let sstop = Arc::new(AtomicBool::new(false));
    let shipping = {
        let (s, st) = (shipper.clone(), sstop.clone());
        std::thread::spawn(move || s.run(st))
    };
    let done = wait("the resync to reach the replica", || {
        journal.mode() == Mode::Journal && !journal.resyncing() && journal.dirty_chunks() == 0 && {
            let sealed = journal.counters.last_sealed_seq.load(Ordering::Acquire);
            sealed > 0 && shipper.counters.last_acked_seq.load(Ordering::Acquire) >= sealed
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let bytes = shipper.counters.bytes_sent.load(Ordering::Relaxed);
    sstop.store(true, Ordering::Release);
    let _ = shipping.join();
    handle.shutdown().map_err(err)?;
    rstop.store(true, Ordering::Release);
    let _ = server.join();
    done?;
    if std::fs::read(&image)? != std::fs::read(rdir.join("disk-0.raw"))? {
        return Err(BenchError::Io(std::io::Error::other(
            "the replica differs from the source after the resync",
        )));
    }
    std::fs::remove_dir_all(&base)?;
    Ok((secs, bytes))
}

/// A replica server on loopback for group `group` (its directory `name`);
/// returns the source's TLS files, the address, and the server's stop
/// flag and thread.
#[allow(clippy::type_complexity)]
fn replica_server(
    dir: &Path,
    name: &str,
    group: u64,
) -> Result<
    (
        keel_cdp::transport::tls::TlsFiles,
        std::net::SocketAddr,
        Arc<AtomicBool>,
        std::thread::JoinHandle<Result<(), replica::ServeError>>,
    ),
    BenchError,
> {
    let (src_tls, rep_tls) =
        generate_pki(&dir.join(format!("pki-{name}")), "dr.keel").map_err(err)?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let rcfg = replica::ReplicaConfig {
        listen,
        dir: dir.join(name),
        group_id: group,
        source_site: SITE,
        keep: 16,
        tls: rep_tls,
    };
    let rstop = Arc::new(AtomicBool::new(false));
    let server = {
        let s = rstop.clone();
        std::thread::spawn(move || replica::serve(&rcfg, &s))
    };
    Ok((src_tls, listen, rstop, server))
}

fn ship_config(
    listen: std::net::SocketAddr,
    tls: keel_cdp::transport::tls::TlsFiles,
) -> ShipConfig {
    ShipConfig {
        replica: listen.to_string(),
        server_name: "dr.keel".into(),
        tls,
        zstd_level: None,
        max_bytes_per_sec: None,
        status_file: None,
    }
}

/// Synchronous mode: each write of `order` waits until the replica
/// acknowledged it (the completion gate released its ticket); returns µs
/// per write, and µs per TCP round trip of 8 bytes on loopback.
fn sync_qd1(
    dir: &Path,
    image: &Path,
    file: &std::fs::File,
    order: &[u64],
    data: &[u8],
) -> Result<(f64, f64), BenchError> {
    let group = GROUP + 2;
    let (tls, listen, rstop, server) = replica_server(dir, "sync-replica", group)?;
    let mut config = journal_config(&dir.join("journal-sync"), image, 8 << 30);
    config.group_id = group;
    config.sync_timeout = Some(Duration::from_secs(60));
    let (journal, handle) = Journal::start(config).map_err(err)?;
    let shipper = Shipper::new(journal.clone(), ship_config(listen, tls)).map_err(err)?;
    let stop = Arc::new(AtomicBool::new(false));
    let threads = [
        {
            let (s, st) = (shipper.clone(), stop.clone());
            std::thread::spawn(move || s.run(st))
        },
        {
            let (s, st) = (shipper.clone(), stop.clone());
            std::thread::spawn(move || s.watch_sync(&st))
        },
    ];
    let gate = journal.gate();
    wait("synchronous mode to engage", || !gate.is_open())?;
    let t = Instant::now();
    for &off in order {
        file.write_all_at(data, off)?;
        journal.record_write(0, off, data);
        let ticket = gate.issued();
        while gate.holds(ticket) {
            std::thread::yield_now();
        }
    }
    let sync_us = t.elapsed().as_secs_f64() * 1e6 / order.len().max(1) as f64;
    let fallbacks = journal.counters.sync_fallbacks.load(Ordering::Relaxed);
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    handle.shutdown().map_err(err)?;
    rstop.store(true, Ordering::Release);
    let _ = server.join();
    if fallbacks > 0 {
        return Err(BenchError::Io(std::io::Error::other(
            "synchronous mode fell back to asynchronous during the run",
        )));
    }
    Ok((sync_us, tcp_round_trip_us(2000)?))
}

/// µs per 8-byte ping-pong over a loopback TCP connection (TCP_NODELAY).
fn tcp_round_trip_us(n: u32) -> Result<f64, BenchError> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 8];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut b = [7u8; 8];
    let t = Instant::now();
    for _ in 0..n {
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    drop(c);
    let _ = echo.join();
    Ok(us)
}

/// Writes `order` through a second journal whose shipper sends to a
/// replica server; returns MB/s from the first write until the replica
/// acknowledged the last segment, and the seconds from the last write to
/// that acknowledgement (what the RPO achieved).
fn ship(
    dir: &Path,
    image: &Path,
    file: &std::fs::File,
    order: &[u64],
    data: &[u8],
) -> Result<(f64, f64), BenchError> {
    let (src_tls, listen, rstop, server) = replica_server(dir, "shipped", GROUP + 1)?;
    let mut config = journal_config(&dir.join("journal-shipped"), image, 8 << 30);
    config.group_id = GROUP + 1;
    let (journal, handle) = Journal::start(config).map_err(err)?;
    let shipper = Shipper::new(journal.clone(), ship_config(listen, src_tls)).map_err(err)?;
    let sstop = Arc::new(AtomicBool::new(false));
    let shipping = {
        let (s, st) = (shipper.clone(), sstop.clone());
        std::thread::spawn(move || s.run(st))
    };
    let caught_up = |j: &Journal| {
        j.mode() == Mode::Journal && !j.resyncing() && j.dirty_chunks() == 0 && {
            let sealed = j.counters.last_sealed_seq.load(Ordering::Acquire);
            sealed > 0 && shipper.counters.last_acked_seq.load(Ordering::Acquire) >= sealed
        }
    };
    wait("the initial copy to reach the replica", || {
        caught_up(&journal)
    })?;
    let t = Instant::now();
    for &off in order {
        file.write_all_at(data, off)?;
        journal.record_write(0, off, data);
    }
    journal.record_flush();
    let last_write = Instant::now();
    let target = journal.counters.last_sealed_seq.load(Ordering::Acquire) + 1;
    wait("the writes to reach the replica", || {
        shipper.counters.last_acked_seq.load(Ordering::Acquire) >= target
            && journal.counters.last_sealed_seq.load(Ordering::Acquire)
                <= shipper.counters.last_acked_seq.load(Ordering::Acquire)
    })?;
    let secs = t.elapsed().as_secs_f64();
    let lag = last_write.elapsed().as_secs_f64();
    sstop.store(true, Ordering::Release);
    let _ = shipping.join();
    handle.shutdown().map_err(err)?;
    rstop.store(true, Ordering::Release);
    let _ = server.join();
    Ok(((order.len() * data.len()) as f64 / 1e6 / secs, lag))
}
