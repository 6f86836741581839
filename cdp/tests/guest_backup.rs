//! End to end: a real QEMU guest (TCG) writes to a disk served by keel's
//! vhost-user-blk backend with CBT on; a full and an incremental backup are
//! taken, then 18 more incrementals; each reads exactly the chunks the
//! bitmap marks, and all 20 points restore to files equal to what the disk
//! held at each point.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use keel_cdp::backup::{
    backup, restore, BackupSpec, Kind, Progress, Repository, RestoreMode, Tracking,
};
use keel_testkit::{Guest, GuestConfig};
use keel_vhost::cbt::Cbt;
use keel_vhost::{
    create_raw_volume, serve, DiskOptions, DiskShared, Provisioning, QueueConfig, RawDisk,
    ServeConfig, ServeError, StopHandle,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const DISK_SIZE: u64 = 64 << 20;
/// Chunk = CBT granule, so chunks read must equal dirty granules.
const GRANULE: u64 = 64 << 10;
const BITMAP: &str = "backup";

/// keel's backend on a thread; stopped on drop.
struct Backend {
    stop: StopHandle,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Backend {
    fn start(sock: &Path, shared: &Arc<DiskShared>, cbt: &Arc<Cbt>) -> Backend {
        let stop = StopHandle::new();
        let config = ServeConfig {
            socket: sock.to_owned(),
            queues: QueueConfig::new(1),
        };
        let thread = {
            let (stop, shared, cbt) = (stop.clone(), shared.clone(), cbt.clone());
            std::thread::spawn(move || serve(&config, shared, cbt, &stop))
        };
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(sock.exists(), "backend did not create its socket");
        Backend {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.stop();
            let _ = t.join();
        }
    }
}

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    assert!(out.status.success());
    first_word(&String::from_utf8_lossy(&out.stdout))
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_owned()
}

/// md5 of the whole disk as the guest reads it through keel.
fn guest_md5(guest: &mut Guest) -> String {
    let out = guest
        .run("echo 3 > /proc/sys/vm/drop_caches; md5sum /dev/vda")
        .unwrap();
    first_word(out.lines().last().unwrap_or_default())
}

fn none(_: Progress) {}

#[test]
fn guest_disk_full_and_incremental_backups_restore_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("vhost.sock");
    create_raw_volume(&img, DISK_SIZE, Provisioning::Thin).unwrap();
    let disk = RawDisk::open(DiskOptions {
        path: img.clone(),
        readonly: false,
        direct: false,
        format: keel_vhost::ImageFormat::Raw,
    })
    .unwrap();
    let shared = Arc::new(DiskShared::new(disk, "keel-backup-disk"));
    let cbt = Arc::new(Cbt::new(DISK_SIZE, GRANULE).unwrap());
    cbt.add_bitmap(BITMAP).unwrap();
    let backend = Backend::start(&sock, &shared, &cbt);

    let chardev = format!("socket,id=vub,path={}", sock.display());
    let mut guest = Guest::boot(GuestConfig::new("keel-backup").qemu_args([
        "-chardev",
        &chardev,
        "-device",
        "vhost-user-blk-pci,chardev=vub,num-queues=1",
    ]))
    .unwrap();

    // Point 0: 8 MiB random at 4 MiB and a text block at 32 MiB.
    guest
        .run(
            "dd if=/dev/urandom of=/dev/vda bs=1M count=8 seek=4 oflag=direct 2>/dev/null && \
             yes keel-backup | head -c 1048576 | dd of=/dev/vda bs=1M seek=32 oflag=direct 2>/dev/null && sync",
        )
        .unwrap();
    let disk0 = guest_md5(&mut guest);
    assert_eq!(md5(&img), disk0, "host image holds what the guest sees");

    let repo = Repository::create(&dir.path().join("repo")).unwrap();
    let mut spec = BackupSpec::new("vm-backup-disk0", &img);
    spec.chunk_size = GRANULE;
    let track = Tracking::Cbt {
        cbt: &cbt,
        bitmap: BITMAP,
    };
    let full = backup(&repo, &spec, track, &none).unwrap();
    assert_eq!(full.kind, Kind::Full);
    assert_eq!(full.chunks_total, DISK_SIZE / GRANULE);
    assert_eq!(full.chunks_read, DISK_SIZE / GRANULE);
    assert_eq!(
        full.chunks_zero,
        DISK_SIZE / GRANULE - (8 * 16 + 16),
        "all but the random and text chunks are zero (not stored)"
    );
    assert!(full.chunks_dedup > 0, "the repeating text chunks dedup");

    // The guest writes more: 4 KiB at 400 KiB, 4 KiB at 20 MiB + 4 KiB,
    // 8 KiB straddling 40 MiB (two granules), over the random area at 5 MiB.
    guest
        .run(
            "dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek=100 oflag=direct 2>/dev/null && \
             dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek=5121 oflag=direct 2>/dev/null && \
             dd if=/dev/urandom of=/dev/vda bs=4096 count=2 seek=10239 oflag=direct 2>/dev/null && \
             dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=1280 oflag=direct 2>/dev/null && sync",
        )
        .unwrap();
    let disk1 = guest_md5(&mut guest);
    assert_ne!(disk1, disk0);
    let dirty = cbt.peek(BITMAP).unwrap();
    assert!(dirty.valid);
    let dirty = dirty.dirty_granules();
    assert_eq!(
        dirty,
        vec![6, 80, 320, 639, 640],
        "granules the guest wrote"
    );

    let inc = backup(&repo, &spec, track, &none).unwrap();
    assert_eq!(inc.kind, Kind::Incremental);
    assert_eq!(inc.fallback, None);
    assert_eq!(
        inc.chunks_read,
        dirty.len() as u64,
        "incremental read exactly the dirty chunks"
    );
    assert!(inc.chunks_read * 100 < inc.chunks_total);
    assert!(cbt.peek(BITMAP).unwrap().dirty_granules().is_empty());

    // More rounds of scattered guest writes, one incremental each: 20
    // points in all, each restoring to the disk at its point.
    let mut points = vec![(full.id.clone(), disk0), (inc.id.clone(), disk1)];
    let mut x = 0x51f1_5e3d_u64;
    for round in 0..18 {
        let mut script = String::from("true");
        for _ in 0..3 + round % 5 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let block = x % (DISK_SIZE / 4096 - 4);
            let count = 1 + x % 3;
            script.push_str(&format!(
                " && dd if=/dev/urandom of=/dev/vda bs=4096 count={count} seek={block} oflag=direct 2>/dev/null"
            ));
        }
        guest.run(&script).unwrap();
        let want = md5(&img);
        let dirty = cbt.peek(BITMAP).unwrap().dirty_granules().len() as u64;
        let r = backup(&repo, &spec, track, &none).unwrap();
        assert_eq!(
            (r.kind, r.chunks_read),
            (Kind::Incremental, dirty),
            "round {round}"
        );
        points.push((r.id, want));
    }
    assert_eq!(guest_md5(&mut guest), points.last().unwrap().1);

    for (id, want) in &points {
        let out = dir.path().join(format!("{id}.raw"));
        let r = restore(&repo, id, &out, RestoreMode::NewFile, 8, &none).unwrap();
        assert!(r.verified);
        assert_eq!(&md5(&out), want, "point {id} equals the disk at that point");
    }
    assert!(repo.verify(&repo.points().unwrap()).unwrap().ok());

    guest.poweroff(EXIT_TIMEOUT).unwrap();
    backend.stop();
}
