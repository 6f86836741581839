//! The CDP pipeline in one process, with real files and a real TLS
//! connection on loopback: journal → sealed segments → (ship) → replica
//! apply; full resync of a new group; dirty mode when the cache fills and
//! resync from the bitmap; refusal of replays, gaps, wrong groups and
//! sites, broken chains and garbage; torn tails; promote to a point.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
#![allow(clippy::cast_possible_truncation)] // test patterns wrap on purpose

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_cdp::journal::format::{self, build_segment, SegmentHeader};
use keel_cdp::journal::{segment_path, writer, Journal, JournalConfig, Mode};
use keel_cdp::replica::{self, Refusal, Replica, StoreError};
use keel_cdp::transport::ship::{ShipConfig, Shipper};
use keel_cdp::transport::tls::generate_pki;

const DISK: u64 = 4 << 20;
const GROUP: u64 = 42;
const SITE: u64 = 1;

fn image(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..DISK).map(|i| (i / 4096) as u8 ^ seed).collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn config(dir: &Path, disks: Vec<PathBuf>) -> JournalConfig {
    let mut c = JournalConfig::new(dir.join("journal"), GROUP, SITE, disks);
    c.rpo = Duration::from_secs(1);
    c.buffer_bytes = 256 << 10;
    c.buffers = 4;
    c.cache_limit_bytes = 64 << 20;
    c.chunk_bytes = 64 << 10;
    c
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `data` to the source image and journals it, as the vhost worker
/// and the hook do for a guest write.
fn guest_write(j: &Journal, img: &Path, disk: u16, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(data, offset).unwrap();
    j.record_write(disk, offset, data);
}

/// Applies every sealed segment in order, deleting each (what the
/// shipper does once acknowledged).
fn apply_all(j: &Journal, r: &mut Replica) -> u64 {
    let dir = &j.config().dir;
    let mut n = 0;
    loop {
        let p = segment_path(dir, r.state().last_seq + 1);
        let Ok(bytes) = std::fs::read(&p) else {
            return n;
        };
        r.receive(&bytes).unwrap();
        std::fs::remove_file(&p).unwrap();
        j.release_cache(bytes.len() as u64);
        n += 1;
    }
}

/// Where a test's shipper sends: the replica on `listen`, named "dr.keel".
fn ship_to(
    listen: std::net::SocketAddr,
    tls: keel_cdp::transport::tls::TlsFiles,
    zstd_level: Option<i32>,
    status_file: Option<PathBuf>,
) -> ShipConfig {
    ShipConfig {
        replica: listen.to_string(),
        server_name: "dr.keel".into(),
        tls,
        zstd_level,
        max_bytes_per_sec: None,
        status_file,
    }
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn new_group_full_resync_then_writes_replicate_exactly_and_restart_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (image(dir.path(), "a.raw", 1), image(dir.path(), "b.raw", 2));
    let (j, h) = Journal::start(config(dir.path(), vec![a.clone(), b.clone()])).unwrap();
    wait("full resync", || {
        j.mode() == Mode::Journal && !j.resyncing() && j.dirty_chunks() == 0
    });
    // Writes on both disks, in one order.
    guest_write(&j, &a, 0, 8192, &[0xAA; 4096]);
    guest_write(&j, &b, 1, 0, &[0xBB; 512]);
    j.record_flush();
    guest_write(&j, &a, 0, DISK - 4096, &[0xCC; 4096]);
    h.shutdown().unwrap();
    assert!(j.config().dir.join("CLEAN").exists());

    let mut r = Replica::open(&dir.path().join("replica"), GROUP, SITE, 8).unwrap();
    assert!(apply_all(&j, &mut r) >= 1);
    assert!(same(&a, &r.disk_path(0)), "disk a replicated");
    assert!(same(&b, &r.disk_path(1)), "disk b replicated");
    assert!(!r.state().in_resync);

    // A clean restart continues the chain without a resync.
    let (j2, h2) = Journal::start(config(dir.path(), vec![a.clone(), b.clone()])).unwrap();
    assert_eq!(j2.dirty_chunks(), 0);
    assert_eq!(j2.mode(), Mode::Journal);
    guest_write(&j2, &b, 1, 65536, &[0xDD; 8192]);
    h2.shutdown().unwrap();
    assert!(apply_all(&j2, &mut r) >= 1);
    assert!(same(&b, &r.disk_path(1)));
}

#[test]
fn cache_full_switches_to_dirty_bitmap_and_resync_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.raw", 3);
    let mut c = config(dir.path(), vec![a.clone()]);
    c.cache_limit_bytes = 2 * 4 * (256 << 10); // the minimum: twice the pool
    let (j, h) = Journal::start(c).unwrap();
    let mut r = Replica::open(&dir.path().join("replica"), GROUP, SITE, 4).unwrap();
    // Nothing ships: the full resync alone overflows the cache.
    wait("dirty mode", || {
        j.counters.dirty_entries.load(Ordering::Relaxed) > 0 && j.mode() == Mode::Dirty
    });
    // Writes in dirty mode only mark the bitmap; guest I/O goes on.
    for i in 0..16u64 {
        guest_write(&j, &a, 0, i * 131072, &[i as u8 + 100; 4096]);
    }
    assert!(j.dirty_chunks() > 0);
    // The link comes back: ship until resync ends and the cache is drained.
    wait("resync complete", || {
        apply_all(&j, &mut r);
        j.mode() == Mode::Journal && !j.resyncing() && j.dirty_chunks() == 0
    });
    h.shutdown().unwrap();
    apply_all(&j, &mut r);
    assert!(
        same(&a, &r.disk_path(0)),
        "replica equals source after resync"
    );
    assert!(!r.state().in_resync);
    assert!(j.counters.dirty_entries.load(Ordering::Relaxed) >= 1);
}

fn seg(group: u64, site: u64, seq: u64, prev: u32, body: &[u8]) -> Vec<u8> {
    build_segment(
        &SegmentHeader {
            group_id: group,
            site_id: site,
            seq,
            prev_checksum: prev,
            flags: 0,
            disks: vec![format::DiskEntry { id: 0, size: DISK }],
        },
        body,
        1000 + seq,
    )
}

fn write_body(offset: u64, byte: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(8192);
    format::encode_record(
        &mut b,
        format::RecordKind::Write,
        0,
        offset,
        4096,
        4096,
        |d| d.fill(byte),
    );
    b
}

fn checksum(s: &[u8]) -> u32 {
    format::Segment::verify(s).unwrap().trailer.checksum
}

#[test]
fn replica_refuses_replays_gaps_wrong_group_site_chain_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open(dir.path(), GROUP, SITE, 4).unwrap();
    let s1 = seg(GROUP, SITE, 1, 0, &write_body(0, 1));
    assert_eq!(r.receive(&s1).unwrap(), 1);
    let c1 = checksum(&s1);
    let refused = |r: &mut Replica, s: &[u8]| match r.receive(s) {
        Err(StoreError::Refused(x)) => x,
        other => panic!("not refused: {other:?}"),
    };
    assert!(matches!(
        refused(&mut r, &s1),
        Refusal::Replay { seq: 1, last: 1 }
    ));
    assert!(matches!(
        refused(&mut r, &seg(GROUP, SITE, 3, c1, &[])),
        Refusal::Gap { seq: 3, last: 1 }
    ));
    assert!(matches!(
        refused(&mut r, &seg(7, SITE, 2, c1, &[])),
        Refusal::WrongGroup { got: 7, .. }
    ));
    assert!(matches!(
        refused(&mut r, &seg(GROUP, 9, 2, c1, &[])),
        Refusal::WrongSite { got: 9, .. }
    ));
    assert!(matches!(
        refused(&mut r, &seg(GROUP, SITE, 2, c1 ^ 1, &[])),
        Refusal::Chain(2)
    ));
    let mut torn = seg(GROUP, SITE, 2, c1, &write_body(4096, 2));
    torn.truncate(torn.len() - 10);
    assert!(matches!(refused(&mut r, &torn), Refusal::Invalid(_)));
    assert!(matches!(refused(&mut r, b"garbage"), Refusal::Invalid(_)));
    // Nothing of the refused segments was applied.
    let disk = std::fs::read(r.disk_path(0)).unwrap();
    assert!(disk[..4096].iter().all(|&b| b == 1));
    assert!(disk[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(r.state().last_seq, 1);
    // The right next segment is still accepted.
    assert_eq!(
        r.receive(&seg(GROUP, SITE, 2, c1, &write_body(4096, 2)))
            .unwrap(),
        2
    );
}

#[test]
fn promote_rolls_back_to_a_chosen_recovery_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open(dir.path(), GROUP, SITE, 4).unwrap();
    let mut prev = 0;
    let mut images = Vec::new();
    for seq in 1..=4u64 {
        let s = seg(
            GROUP,
            SITE,
            seq,
            prev,
            &write_body(4096 * (seq % 2), seq as u8),
        );
        r.receive(&s).unwrap();
        prev = checksum(&s);
        images.push(std::fs::read(r.disk_path(0)).unwrap());
    }
    let points: Vec<u64> = r.points().iter().map(|p| p.seq).collect();
    assert_eq!(points, vec![1, 2, 3, 4]);
    drop(r);
    let mut r = Replica::open_existing(dir.path()).unwrap();
    assert_eq!(r.promote(Some(2)).unwrap(), 2);
    assert_eq!(std::fs::read(r.disk_path(0)).unwrap(), images[1]);
    assert!(matches!(
        r.receive(&seg(GROUP, SITE, 3, prev, &[])),
        Err(StoreError::Refused(Refusal::Promoted))
    ));
}

#[test]
fn recovery_drops_unsealed_and_corrupt_tails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s1 = seg(GROUP, SITE, 1, 0, &write_body(0, 1));
    let s2 = seg(GROUP, SITE, 2, checksum(&s1), &write_body(0, 2));
    let mut s3 = seg(GROUP, SITE, 3, checksum(&s2), &write_body(0, 3));
    std::fs::write(segment_path(d, 1), &s1).unwrap();
    std::fs::write(segment_path(d, 2), &s2).unwrap();
    let n = s3.len();
    s3[n / 2] ^= 1; // corrupted record
    std::fs::write(segment_path(d, 3), &s3).unwrap();
    // An unsealed tail: header + one whole record + half a record.
    let mut open = s1[..s1.len() - format::TRAILER_LEN].to_vec();
    open.extend_from_slice(&write_body(0, 9)[..100]);
    std::fs::write(d.join("seg-0000000000000004.open"), &open).unwrap();
    std::fs::write(d.join("CLEAN"), b"clean\n").unwrap();
    let rec = writer::recover(d).unwrap();
    assert_eq!(rec.chain.seq, 2);
    assert_eq!(rec.chain.checksum, checksum(&s2));
    assert_eq!(rec.dropped.len(), 2);
    assert!(!rec.clean, "a dropped tail means a resync is due");
    assert!(!d.join("seg-0000000000000004.open").exists());
    assert!(!segment_path(d, 3).exists());
    assert!(segment_path(d, 2).exists());
}

#[test]
fn segments_ship_over_mutual_tls_and_resume_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.raw", 5);
    let (src_tls, rep_tls) = generate_pki(&dir.path().join("pki"), "dr.keel").unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rcfg = replica::ReplicaConfig {
        listen,
        dir: dir.path().join("replica"),
        group_id: GROUP,
        source_site: SITE,
        keep: 4,
        tls: rep_tls.clone(),
    };
    let rstop = Arc::new(AtomicBool::new(false));
    let rthread = {
        let (c, s) = (rcfg.clone(), rstop.clone());
        std::thread::spawn(move || replica::serve(&c, &s))
    };
    let (j, h) = Journal::start(config(dir.path(), vec![a.clone()])).unwrap();
    let ship = Shipper::new(
        j.clone(),
        ship_to(
            listen,
            src_tls.clone(),
            Some(1),
            Some(dir.path().join("status.json")),
        ),
    )
    .unwrap();
    let sstop = Arc::new(AtomicBool::new(false));
    let sthread = {
        let (s, st) = (ship.clone(), sstop.clone());
        std::thread::spawn(move || s.run(st))
    };
    wait("resync", || j.mode() == Mode::Journal && !j.resyncing());
    guest_write(&j, &a, 0, 12288, &[0x5A; 4096]);
    j.record_flush();
    let want = |j: &Journal| j.counters.last_sealed_seq.load(Ordering::Acquire);
    let sealed_after_write = want(&j) + 1;
    wait("shipped", || {
        ship.counters.last_acked_seq.load(Ordering::Acquire) > sealed_after_write
    });
    assert!(same(&a, &rcfg.dir.join("disk-0.raw")));
    assert!(ship.counters.bytes_sent.load(Ordering::Relaxed) > 0);

    // Replica restarts: the shipper reconnects and resumes after its last
    // applied segment.
    rstop.store(true, Ordering::Release);
    rthread.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    guest_write(&j, &a, 0, 0, &[0x77; 4096]);
    let rstop2 = Arc::new(AtomicBool::new(false));
    let rthread2 = {
        let (c, s) = (rcfg.clone(), rstop2.clone());
        std::thread::spawn(move || replica::serve(&c, &s))
    };
    let target = want(&j) + 1;
    wait("resumed", || {
        ship.counters.last_acked_seq.load(Ordering::Acquire) > target
    });
    assert!(same(&a, &rcfg.dir.join("disk-0.raw")));

    sstop.store(true, Ordering::Release);
    sthread.join().unwrap();
    // The shipper writes its final status when it stops.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("status.json")).unwrap()).unwrap();
    assert!(status["segments_acked"].as_u64().unwrap() > 0);
    assert!(status["bytes_sent"].as_u64().unwrap() > 0);

    // With the replica free again, a client with a certificate from another
    // CA is refused by TLS and ships nothing.
    let (other, _) = generate_pki(&dir.path().join("other"), "dr.keel").unwrap();
    let rogue = Shipper::new(j.clone(), ship_to(listen, other, None, None)).unwrap();
    let rstop3 = Arc::new(AtomicBool::new(false));
    let rt = {
        let (r, s) = (rogue.clone(), rstop3.clone());
        std::thread::spawn(move || r.run(s))
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rogue.counters.segments_acked.load(Ordering::Relaxed), 0);
    assert!(
        rogue.counters.disconnects.load(Ordering::Relaxed) >= 1,
        "the replica closed the rogue's connection"
    );
    rstop3.store(true, Ordering::Release);
    rt.join().unwrap();

    h.shutdown().unwrap();
    rstop2.store(true, Ordering::Release);
    rthread2.join().unwrap().unwrap();
}

/// A replica server and a shipper on loopback; stopped (and joined) on drop,
/// also when the test fails.
struct Link {
    ship: Arc<Shipper>,
    rstop: Arc<AtomicBool>,
    sstop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Link {
    fn start(dir: &Path, j: &Arc<Journal>, replica_dir: &Path) -> Link {
        let (src_tls, rep_tls) = generate_pki(&dir.join("pki"), "dr.keel").unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let rcfg = replica::ReplicaConfig {
            listen,
            dir: replica_dir.to_owned(),
            group_id: GROUP,
            source_site: SITE,
            keep: 4,
            tls: rep_tls,
        };
        let rstop = Arc::new(AtomicBool::new(false));
        let sstop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let s = rstop.clone();
            threads.push(std::thread::spawn(move || {
                replica::serve(&rcfg, &s).unwrap();
            }));
        }
        let ship = Shipper::new(
            j.clone(),
            ship_to(listen, src_tls, None, Some(dir.join("status.json"))),
        )
        .unwrap();
        {
            let (s, st) = (ship.clone(), sstop.clone());
            threads.push(std::thread::spawn(move || s.run(st)));
        }
        Link {
            ship,
            rstop,
            sstop,
            threads,
        }
    }

    /// Waits until the resync ended and the replica applied everything
    /// journaled until now.
    fn settle(&self, j: &Journal) {
        wait("resync complete", || {
            j.mode() == Mode::Journal && !j.resyncing() && j.dirty_chunks() == 0
        });
        let target = j.counters.last_sealed_seq.load(Ordering::Acquire) + 1;
        wait("shipped", || {
            self.ship.counters.last_acked_seq.load(Ordering::Acquire) >= target
        });
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.sstop.store(true, Ordering::Release);
        self.rstop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn delta_config(dir: &Path, disks: Vec<PathBuf>) -> JournalConfig {
    let mut c = config(dir, disks);
    c.digest_before_resync = true;
    c
}

#[test]
fn delta_resync_sends_only_the_chunks_the_replica_lacks() {
    const DIFFERENT: [u64; 5] = [0, 7, 8, 40, 63];
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.raw", 6);
    let b = image(dir.path(), "b.raw", 7);
    // Adopted replica disks: disk 0 the same data except 5 chunks (and its
    // tail shorter than the source), disk 1 missing altogether.
    let rdir = dir.path().join("replica");
    std::fs::create_dir_all(&rdir).unwrap();
    let mut old = std::fs::read(&a).unwrap();
    for c in DIFFERENT {
        let at = usize::try_from(c * 65536 + 100).unwrap();
        old[at] ^= 0xFF;
    }
    old.truncate(old.len() - 1000); // the last chunk is short: it differs too
    std::fs::write(rdir.join("disk-0.raw"), &old).unwrap();

    let (j, h) = Journal::start(delta_config(dir.path(), vec![a.clone(), b.clone()])).unwrap();
    assert!(
        j.resync_held(),
        "a new group waits for the digest comparison"
    );
    let link = Link::start(dir.path(), &j, &rdir);
    link.settle(&j);
    let chunks = DISK / 65536;
    let c = &j.counters;
    assert_eq!(c.digest_compared.load(Ordering::Relaxed), 2 * chunks);
    let differing = DIFFERENT.len() as u64; // 63 is also the short last chunk
    assert_eq!(
        c.digest_equal.load(Ordering::Relaxed),
        chunks - differing,
        "disk 0 equal except the changed chunks; disk 1 missing: nothing equal"
    );
    assert_eq!(
        c.resync_chunks.load(Ordering::Relaxed),
        differing + chunks,
        "only the differing chunks were resent"
    );
    assert_eq!(
        c.digest_bytes_saved.load(Ordering::Relaxed),
        (chunks - differing) * 65536
    );
    assert!(same(&a, &rdir.join("disk-0.raw")), "disk 0 repaired");
    assert!(same(&b, &rdir.join("disk-1.raw")), "disk 1 copied");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("status.json")).unwrap()).unwrap();
    assert_eq!(status["digest_equal"].as_u64(), Some(chunks - differing));
    drop(link);
    h.shutdown().unwrap();
    let r = Replica::open_existing(&rdir).unwrap();
    assert!(!r.state().in_resync, "replica consistent after the resync");
}

#[test]
fn writes_during_the_digest_pass_and_resync_are_not_lost() {
    const BIG: u64 = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let data: Vec<u8> = (0..BIG).map(|i| (i / 4096) as u8 ^ 0x33).collect();
    std::fs::write(&a, &data).unwrap();
    let rdir = dir.path().join("replica");
    std::fs::create_dir_all(&rdir).unwrap();
    std::fs::write(rdir.join("disk-0.raw"), &data).unwrap();

    let mut c = delta_config(dir.path(), vec![a.clone()]);
    c.buffer_bytes = 1 << 20;
    c.buffers = 8;
    let (j, h) = Journal::start(c).unwrap();
    let stop_writes = Arc::new(AtomicBool::new(false));
    // The guest writes from before the shipper connects until after the
    // resync ended: through the hold, the digest pass and the resync.
    let writer = {
        let (j, a, stop) = (j.clone(), a.clone(), stop_writes.clone());
        std::thread::spawn(move || {
            let random = keel_testkit::pseudo_random(8 * 4096, 7);
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) || n < 200 {
                let i = usize::try_from(n % 4096).unwrap() * 8;
                let x = u64::from_le_bytes(random[i..i + 8].try_into().unwrap());
                let offset = (x % (BIG / 4096)) * 4096;
                guest_write(&j, &a, 0, offset, &[(x >> 32) as u8; 4096]);
                n += 1;
                if n.is_multiple_of(16) {
                    j.record_flush();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let link = Link::start(dir.path(), &j, &rdir);
    wait("digest pass done", || !j.resync_held());
    // Writes go on into the resync (a resync started by now, or even done).
    let resent = j.counters.resync_chunks.load(Ordering::Relaxed);
    wait("resync under way", || {
        j.counters.resync_chunks.load(Ordering::Relaxed) > resent + 20
            || (!j.resyncing() && j.mode() == Mode::Journal)
    });
    stop_writes.store(true, Ordering::Release);
    let writes = writer.join().unwrap();
    link.settle(&j);
    assert!(writes >= 200);
    let c = &j.counters;
    assert_eq!(c.digest_compared.load(Ordering::Relaxed), BIG / 65536);
    assert!(same(&a, &rdir.join("disk-0.raw")), "no write lost");
    drop(link);
    h.shutdown().unwrap();
}

/// One end of a connection whose peer's frames are canned; `on_read`
/// runs when the source first reads the answer (after it took the dirty
/// bits out and hashed its chunks, before it compares).
struct Canned {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
    on_read: Option<Box<dyn FnOnce()>>,
}

impl std::io::Read for Canned {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(f) = self.on_read.take() {
            f();
        }
        self.input.read(buf)
    }
}

impl std::io::Write for Canned {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_replica_answering_garbage_digests_is_refused_and_nothing_is_skipped() {
    use keel_cdp::transport::digest::{self, DigestError};
    use keel_cdp::transport::wire::{Frame, DIGEST_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.raw", 8);
    let chunks = DISK / 65536;
    // Digests of the right content, but for the wrong range / disk / count,
    // a wrong version, and bytes that are no frame at all.
    let right: Vec<_> = std::fs::read(&a)
        .unwrap()
        .chunks(65536)
        .map(|c| Some(digest::digest(c)))
        .collect();
    let answers: Vec<Vec<u8>> = vec![
        (1, 0, 1, chunks),
        (0, 1, 1, chunks),
        (0, 0, 1, chunks - 1),
        (0, 0, 2, chunks),
    ]
    .into_iter()
    .map(|(disk, first, version, n)| {
        let mut b = Vec::new();
        Frame::Digests {
            version: if version == 1 { DIGEST_VERSION } else { 99 },
            disk,
            first_chunk: first,
            digests: right[..usize::try_from(n).unwrap()].to_vec(),
        }
        .write_to(&mut b)
        .unwrap();
        b
    })
    .chain([b"\x06\x03\x00\x00\x00abc".to_vec()])
    .collect();
    for (i, answer) in answers.into_iter().enumerate() {
        let jdir = dir.path().join(format!("j{i}"));
        let (j, h) = Journal::start(delta_config(&jdir, vec![a.clone()])).unwrap();
        let mut peer = Canned {
            input: std::io::Cursor::new(answer),
            output: Vec::new(),
            on_read: None,
        };
        let r = digest::pass(&j, &mut peer, &AtomicBool::new(false));
        assert!(
            matches!(r, Err(DigestError::Invalid(_))),
            "answer {i} not refused: {r:?}"
        );
        assert_eq!(
            j.dirty_chunks(),
            chunks,
            "answer {i}: every chunk still resent"
        );
        assert!(!j.resync_held(), "answer {i}: the full resync goes ahead");
        h.shutdown().unwrap();
    }
}

#[test]
fn a_write_completing_while_a_chunk_is_compared_is_resent() {
    use keel_cdp::transport::digest;
    use keel_cdp::transport::wire::{Frame, DIGEST_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.raw", 9);
    let chunks = DISK / 65536;
    // The replica holds exactly the source's content.
    let mut answer = Vec::new();
    Frame::Digests {
        version: DIGEST_VERSION,
        disk: 0,
        first_chunk: 0,
        digests: std::fs::read(&a)
            .unwrap()
            .chunks(65536)
            .map(|c| Some(digest::digest(c)))
            .collect(),
    }
    .write_to(&mut answer)
    .unwrap();
    let (j, h) = Journal::start(delta_config(dir.path(), vec![a.clone()])).unwrap();
    // A guest write to chunk 3 completes after the source hashed chunk 3
    // (still equal to the replica's) and before it compares.
    let on_read: Box<dyn FnOnce()> = {
        let (j, a) = (j.clone(), a.clone());
        Box::new(move || guest_write(&j, &a, 0, 3 * 65536 + 4096, &[0xEE; 4096]))
    };
    let mut peer = Canned {
        input: std::io::Cursor::new(answer),
        output: Vec::new(),
        on_read: Some(on_read),
    };
    let report = digest::pass(&j, &mut peer, &AtomicBool::new(false)).unwrap();
    assert_eq!(report.compared, chunks);
    assert_eq!(report.equal, chunks, "every chunk matched when hashed");
    assert_eq!(
        j.dirty_chunks(),
        1,
        "the concurrent write's chunk is resent"
    );
    assert!(!j.resync_held());
    h.shutdown().unwrap();
}

type ReplicaThread = (
    Arc<AtomicBool>,
    std::thread::JoinHandle<Result<(), keel_cdp::replica::ServeError>>,
);

fn serve_replica(c: &replica::ReplicaConfig) -> ReplicaThread {
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (c, s) = (c.clone(), stop.clone());
        std::thread::spawn(move || replica::serve(&c, &s))
    };
    (stop, t)
}

fn stop_replica((stop, t): ReplicaThread) {
    stop.store(true, Ordering::Release);
    t.join().unwrap().unwrap();
}

fn block_at(path: &Path, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

/// Synchronous mode: a write's completion is released only once the
/// replica has applied it (checked the moment the gate lets it go); with
/// the replica gone, held writes go after the timeout (fallback, counted)
/// and synchronous mode comes back once the replica caught up.
#[test]
fn sync_mode_releases_a_write_only_when_the_replica_has_it_and_falls_back_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.raw", 9);
    let (src_tls, rep_tls) = generate_pki(&dir.path().join("pki"), "dr.keel").unwrap();
    let listen: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let rcfg = replica::ReplicaConfig {
        listen,
        dir: dir.path().join("replica"),
        group_id: GROUP,
        source_site: SITE,
        keep: 4,
        tls: rep_tls,
    };
    let rdisk = rcfg.dir.join("disk-0.raw");
    let r = serve_replica(&rcfg);
    let mut jc = config(dir.path(), vec![a.clone()]);
    jc.sync_timeout = Some(Duration::from_secs(1));
    let (j, h) = Journal::start(jc).unwrap();
    let ship = Shipper::new(j.clone(), ship_to(listen, src_tls, None, None)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let shipper = {
        let (s, st) = (ship.clone(), stop.clone());
        std::thread::spawn(move || s.run(st))
    };
    let watchdog = {
        let (s, st) = (ship.clone(), stop.clone());
        std::thread::spawn(move || s.watch_sync(&st))
    };
    let gate = j.gate();
    assert!(gate.is_open(), "open until the replica is consistent");
    wait("synchronous mode engaged", || !gate.is_open());
    assert_eq!(ship.status().replication, "sync");

    for i in 0..16u64 {
        let data = vec![0xA0 ^ i as u8; 4096];
        guest_write(&j, &a, 0, i * 8192, &data);
        let ticket = gate.issued();
        wait("the write's release", || !gate.holds(ticket));
        assert_eq!(
            block_at(&rdisk, i * 8192),
            data,
            "write {i} is on the replica when its completion is released"
        );
    }
    assert_eq!(j.counters.sync_fallbacks.load(Ordering::Relaxed), 0);

    // The DR site goes away: the write is held, then let go after the
    // timeout; the status says so.
    stop_replica(r);
    guest_write(&j, &a, 0, 1 << 20, &[0x33; 4096]);
    let ticket = gate.issued();
    assert!(
        gate.holds(ticket),
        "held while the replica may still answer"
    );
    wait("the fallback", || !gate.holds(ticket));
    assert!(gate.is_open());
    assert_eq!(j.counters.sync_fallbacks.load(Ordering::Relaxed), 1);
    assert_eq!(ship.status().replication, "sync-fallback");
    guest_write(&j, &a, 0, 2 << 20, &[0x44; 4096]);
    assert!(!gate.holds(gate.issued()), "asynchronous meanwhile");

    // Back: the replica catches up and synchronous mode engages again.
    let r = serve_replica(&rcfg);
    wait("synchronous mode again", || !gate.is_open());
    guest_write(&j, &a, 0, 3 << 20, &[0x55; 4096]);
    let ticket = gate.issued();
    wait("the write's release", || !gate.holds(ticket));
    assert_eq!(block_at(&rdisk, 3 << 20), vec![0x55; 4096]);
    assert_eq!(block_at(&rdisk, 1 << 20), vec![0x33; 4096]);
    assert_eq!(block_at(&rdisk, 2 << 20), vec![0x44; 4096]);

    stop.store(true, Ordering::Release);
    watchdog.join().unwrap();
    shipper.join().unwrap();
    h.shutdown().unwrap();
    stop_replica(r);
}

/// Cut times far ahead of the replica's clock, or far behind the segment
/// before, are refused (nothing applied); the same segment passes once
/// the times agree.
#[test]
fn replica_refuses_segments_whose_cut_time_is_skewed() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open(dir.path(), GROUP, SITE, 4).unwrap();
    let header = |seq, prev| SegmentHeader {
        group_id: GROUP,
        site_id: SITE,
        seq,
        prev_checksum: prev,
        flags: 0,
        disks: vec![format::DiskEntry { id: 0, size: DISK }],
    };
    let now = keel_cdp::journal::now_ms();
    let ahead = build_segment(&header(1, 0), &write_body(0, 1), now + 3_600_000);
    match r.receive(&ahead) {
        Err(StoreError::Refused(Refusal::ClockAhead { ahead_ms })) => {
            assert!(ahead_ms > 3_500_000, "{ahead_ms}");
        }
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(r.state().last_seq, 0);
    let s1 = build_segment(&header(1, 0), &write_body(0, 1), now);
    assert_eq!(r.receive(&s1).unwrap(), 1);
    let back = build_segment(
        &header(2, checksum(&s1)),
        &write_body(0, 2),
        now - 3_600_000,
    );
    assert!(matches!(
        r.receive(&back),
        Err(StoreError::Refused(Refusal::ClockBack { .. }))
    ));
    let disk = std::fs::read(r.disk_path(0)).unwrap();
    assert!(disk[..4096].iter().all(|&b| b == 1), "nothing applied");
    let s2 = build_segment(&header(2, checksum(&s1)), &write_body(0, 2), now + 10);
    assert_eq!(r.receive(&s2).unwrap(), 2);
}
