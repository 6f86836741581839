//! A real QEMU guest (TCG, memfd shared memory) on keel's vhost-user-blk
//! backend, served in-process through the library API.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use keel_testkit::{Guest, GuestConfig};
use keel_vhost::cbt::{Cbt, DEFAULT_BITMAP, DEFAULT_GRANULARITY};
use keel_vhost::{
    create_raw_volume, serve, DiskOptions, DiskShared, Provisioning, QueueConfig, RawDisk,
    ServeConfig, ServeError, StopHandle, WriteData, WriteHook,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const DISK_SIZE: u64 = 64 << 20;

/// Counts what passed the write hook.
#[derive(Default)]
struct Recorder {
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
}

impl WriteHook for Recorder {
    fn on_write(&self, _offset: u64, _len: u64, _data: &WriteData<'_>) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
    fn on_discard(&self, _offset: u64, _len: u64) {
        self.discards.fetch_add(1, Ordering::Relaxed);
    }
    fn on_flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }
}

type Hook = (Arc<Cbt>, Arc<Recorder>);

/// keel's backend on a thread; stopped on drop.
struct Backend {
    stop: StopHandle,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Backend {
    fn start(sock: &Path, shared: &Arc<DiskShared>, hook: &Hook, queues: u16) -> Backend {
        let _ = std::fs::remove_file(sock);
        let stop = StopHandle::new();
        let config = ServeConfig {
            socket: sock.to_owned(),
            queues: QueueConfig::new(queues),
        };
        let thread = {
            let (stop, shared, hook) = (stop.clone(), shared.clone(), hook.clone());
            std::thread::spawn(move || serve(&config, shared, hook, &stop))
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

struct Setup {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    shared: Arc<DiskShared>,
    hook: Hook,
}

fn setup(readonly: bool, fill: Option<u8>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("vhost.sock");
    create_raw_volume(&img, DISK_SIZE, Provisioning::Thin).unwrap();
    if let Some(b) = fill {
        std::fs::write(&img, vec![b; usize::try_from(DISK_SIZE).unwrap()]).unwrap();
    }
    let disk = RawDisk::open(DiskOptions {
        path: img.clone(),
        readonly,
        direct: false,
        format: keel_vhost::ImageFormat::Raw,
    })
    .unwrap();
    let shared = Arc::new(DiskShared::new(disk, "keel-test-disk"));
    let cbt = Cbt::open(&dir.path().join("disk.cbt"), DISK_SIZE, DEFAULT_GRANULARITY).unwrap();
    let hook = (Arc::new(cbt), Arc::new(Recorder::default()));
    Setup {
        _dir: dir,
        img,
        sock,
        shared,
        hook,
    }
}

fn boot(name: &str, sock: &Path, extra_chardev: &str, queues: u16) -> Guest {
    let chardev = format!("socket,id=vub,path={}{extra_chardev}", sock.display());
    let device = format!("vhost-user-blk-pci,chardev=vub,num-queues={queues}");
    let mut config = GuestConfig::new(name).qemu_args(["-chardev", &chardev, "-device", &device]);
    // Linux uses at most one queue per vCPU.
    config.vcpus = u32::from(queues);
    Guest::boot(config).unwrap()
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_owned()
}

/// md5 of `count` 4 KiB blocks of the host image from block `skip`.
fn host_md5(img: &Path, skip: u64, count: u64) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if={} bs=4096 skip={skip} count={count} 2>/dev/null | md5sum",
            img.display()
        ))
        .output()
        .unwrap();
    first_word(&String::from_utf8_lossy(&out.stdout))
}

#[test]

fn guest_reads_writes_flushes_and_discards_through_keel() {
    let s = setup(false, None);
    let backend = Backend::start(&s.sock, &s.shared, &s.hook, 2);
    let mut guest = boot("keel-vblk", &s.sock, "", 2);
    let (cbt, rec) = &s.hook;

    // Config space: capacity, read-write, discard, serial (GET_ID), queues.
    assert_eq!(
        guest.run("cat /sys/block/vda/size").unwrap().trim(),
        "131072"
    );
    assert_eq!(guest.run("cat /sys/block/vda/ro").unwrap().trim(), "0");
    assert_ne!(
        guest
            .run("cat /sys/block/vda/queue/discard_max_bytes")
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        guest.run("cat /sys/block/vda/serial").unwrap().trim(),
        "keel-test-disk"
    );
    assert_eq!(
        guest.run("ls /sys/block/vda/mq | wc -l").unwrap().trim(),
        "2"
    );

    // A 1 MiB random pattern at 1 MiB, read back past the page cache.
    let want = first_word(
        &guest
            .run("dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null && md5sum /tmp/pat")
            .unwrap(),
    );
    guest
        .run("dd if=/tmp/pat of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null")
        .unwrap();
    assert!(
        rec.flushes.load(Ordering::Relaxed) > 0,
        "conv=fsync sent FLUSH"
    );
    // (blockdev --flushbufs only flushes when something is dirty.)
    guest
        .run("sync && blockdev --flushbufs /dev/vda && echo 3 > /proc/sys/vm/drop_caches")
        .unwrap();
    let got = first_word(
        &guest
            .run("dd if=/dev/vda bs=4096 skip=256 count=256 2>/dev/null | md5sum")
            .unwrap(),
    );
    assert_eq!(got, want, "guest reads back what it wrote");
    assert_eq!(
        host_md5(&s.img, 256, 256),
        want,
        "host file holds the same bytes"
    );
    assert!(rec.writes.load(Ordering::Relaxed) > 0);

    // Discard the first half of the pattern: reads zero, space released.
    let blocks_before = s.img.metadata().unwrap().blocks();
    guest
        .run("blkdiscard -o 1048576 -l 524288 /dev/vda && echo 3 > /proc/sys/vm/drop_caches")
        .unwrap();
    assert!(rec.discards.load(Ordering::Relaxed) > 0);
    let zeros = host_md5(Path::new("/dev/zero"), 0, 128);
    let got = first_word(
        &guest
            .run("dd if=/dev/vda bs=4096 skip=256 count=128 2>/dev/null | md5sum")
            .unwrap(),
    );
    assert_eq!(got, zeros, "discarded range reads zero in the guest");
    assert_eq!(host_md5(&s.img, 256, 128), zeros);
    assert_eq!(host_md5(&s.img, 384, 128), {
        let out = guest
            .run("dd if=/tmp/pat bs=4096 skip=128 count=128 2>/dev/null | md5sum")
            .unwrap();
        first_word(&out)
    });
    assert!(
        s.img.metadata().unwrap().blocks() < blocks_before,
        "hole punched"
    );

    // CBT: after a reset, exactly the granules the guest writes are dirty.
    cbt.freeze_and_reset(DEFAULT_BITMAP).unwrap();
    guest
        .run(
            "dd if=/tmp/pat of=/dev/vda bs=4096 count=1 seek=1281 oflag=direct 2>/dev/null && \
             dd if=/tmp/pat of=/dev/vda bs=4096 count=2 seek=2559 oflag=direct 2>/dev/null",
        )
        .unwrap();
    let dirty = cbt.peek(DEFAULT_BITMAP).unwrap();
    assert!(dirty.valid);
    assert_eq!(dirty.dirty_granules(), vec![80, 159, 160]);

    guest.poweroff(EXIT_TIMEOUT).unwrap();
    backend.stop();
    cbt.persist_clean().unwrap();
}

#[test]

fn read_only_disk_refuses_writes() {
    let s = setup(true, Some(0xab));
    let backend = Backend::start(&s.sock, &s.shared, &s.hook, 1);
    let mut guest = boot("keel-vblk-ro", &s.sock, "", 1);
    assert_eq!(guest.run("cat /sys/block/vda/ro").unwrap().trim(), "1");
    let (code, _) = guest
        .exec(
            "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct",
            EXIT_TIMEOUT,
        )
        .unwrap();
    assert_ne!(code, 0, "write to a read-only disk fails");
    // Try harder: clear the guest's read-only flag (the kernel may refuse).
    let (code, _) = guest
        .exec(
            "blockdev --setrw /dev/vda; dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct",
            EXIT_TIMEOUT,
        )
        .unwrap();
    assert_ne!(code, 0, "write still fails");
    // Reads work.
    let got = guest
        .run("dd if=/dev/vda bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1")
        .unwrap();
    assert!(got.trim().starts_with("ab ab ab"), "{got}");
    guest.poweroff(EXIT_TIMEOUT).unwrap();
    backend.stop();
    assert_eq!(s.hook.1.writes.load(Ordering::Relaxed), 0);
    let data = std::fs::read(&s.img).unwrap();
    assert!(data.iter().all(|&b| b == 0xab), "image unchanged");
}

#[test]

fn backend_restart_with_reconnect_loses_no_io() {
    let s = setup(false, None);
    let backend = Backend::start(&s.sock, &s.shared, &s.hook, 1);
    let mut guest = boot("keel-vblk-rc", &s.sock, ",reconnect=1", 1);
    // Block i holds the text "block-i" (4 KiB each).
    let write_blocks = |from: u32, to: u32| {
        format!(
            "i={from}; while [ $i -lt {to} ]; do printf 'block-%05d' $i | \
             dd of=/dev/vda bs=4096 seek=$i conv=sync oflag=direct 2>/dev/null || exit 1; \
             i=$((i+1)); done"
        )
    };
    guest.run(&write_blocks(0, 64)).unwrap();

    // Backend goes away; the guest keeps issuing I/O, which waits.
    backend.stop();
    guest
        .run(&format!(
            "( {} && sync && echo ok > /tmp/done ) > /dev/null 2>&1 &",
            write_blocks(64, 128)
        ))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // QEMU's own complaints about the missing socket share the transcript.
    let state = guest
        .run("cat /tmp/done 2>/dev/null || echo pending")
        .unwrap();
    assert_eq!(
        state.trim().lines().last(),
        Some("pending"),
        "I/O cannot complete without a backend: {state}"
    );

    // A new backend on the same socket: QEMU reconnects, I/O resumes.
    let backend = Backend::start(&s.sock, &s.shared, &s.hook, 1);
    guest
        .run("n=0; while [ ! -f /tmp/done ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done; cat /tmp/done")
        .unwrap();
    let check = "echo 3 > /proc/sys/vm/drop_caches; i=0; while [ $i -lt 128 ]; do \
                 want=$(printf 'block-%05d' $i); \
                 got=$(dd if=/dev/vda bs=4096 skip=$i count=1 2>/dev/null | head -c 11); \
                 [ \"$got\" = \"$want\" ] || { echo bad $i; exit 1; }; i=$((i+1)); done; echo all-good";
    assert_eq!(guest.run(check).unwrap().trim(), "all-good");
    guest.poweroff(EXIT_TIMEOUT).unwrap();
    backend.stop();

    let data = std::fs::read(&s.img).unwrap();
    for i in 0..128usize {
        let want = format!("block-{i:05}");
        assert_eq!(
            &data[i * 4096..i * 4096 + 11],
            want.as_bytes(),
            "block {i} on host"
        );
    }
}

/// Runs `qemu-img` and returns its stdout; a failure fails the test.
fn qemu_img(args: &[&str]) -> String {
    keel_testkit::run(&[&["qemu-img"], args].concat())
        .unwrap()
        .stdout
}

#[test]
fn guest_on_a_qcow2_image_over_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // The backing file: 16 MiB of a pattern, then zeros; qcow2 by qemu-img.
    let mut base = keel_testkit::pseudo_random(16 << 20, 0x9e37_79b9_7f4a_7c15);
    base.resize(usize::try_from(DISK_SIZE).unwrap(), 0);
    std::fs::write(p("base.raw"), &base).unwrap();
    let path = |n: &str| p(n).to_str().unwrap().to_owned();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &path("base.raw"),
        &path("base.qcow2"),
    ]);
    // The disk: keel's qcow2 (128 KiB clusters) over it.
    keel_vhost::qcow2::create(
        &p("top.qcow2"),
        &keel_vhost::qcow2::CreateOptions {
            size: DISK_SIZE,
            cluster_size: 128 << 10,
            backing: Some(("base.qcow2".into(), "qcow2".into())),
        },
    )
    .unwrap();
    let disk = RawDisk::open(DiskOptions {
        path: p("top.qcow2"),
        readonly: false,
        direct: true,
        format: keel_vhost::ImageFormat::Qcow2,
    })
    .unwrap();
    let shared = Arc::new(DiskShared::new(disk, "keel-qcow2"));
    let cbt = Cbt::open(&p("top.cbt"), DISK_SIZE, DEFAULT_GRANULARITY).unwrap();
    let hook: Hook = (Arc::new(cbt), Arc::new(Recorder::default()));
    let sock = p("vhost.sock");
    let backend = Backend::start(&sock, &shared, &hook, 2);
    let mut guest = boot("keel-qcow2", &sock, "", 2);
    let md5 = |g: &mut Guest, skip: u64, count: u64| {
        first_word(
            &g.run(&format!(
                "dd if=/dev/vda bs=4096 skip={skip} count={count} 2>/dev/null | md5sum"
            ))
            .unwrap(),
        )
    };

    // The backing file's data shows through.
    assert_eq!(md5(&mut guest, 0, 4096), host_md5(&p("base.raw"), 0, 4096));
    // A 4 KiB write inside a cluster of backing data (the rest of the
    // cluster is copied up), 1 MiB over zeros, a discard of whole clusters.
    guest
        .run(
            "dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null && \
             dd if=/tmp/pat of=/dev/vda bs=4096 count=1 seek=3 oflag=direct 2>/dev/null && \
             dd if=/tmp/pat of=/dev/vda bs=4096 seek=8192 conv=fsync 2>/dev/null && \
             blkdiscard -o 50331648 -l 1048576 /dev/vda && \
             sync && echo 3 > /proc/sys/vm/drop_caches",
        )
        .unwrap();
    let pat = first_word(&guest.run("md5sum /tmp/pat").unwrap());
    let pat0 = first_word(&guest.run("head -c 4096 /tmp/pat | md5sum").unwrap());
    assert_eq!(md5(&mut guest, 3, 1), pat0);
    assert_eq!(md5(&mut guest, 8192, 256), pat);
    let first = md5(&mut guest, 0, 4096);
    assert_eq!(
        md5(&mut guest, 12288, 256),
        host_md5(Path::new("/dev/zero"), 0, 256),
        "the discarded clusters read zeros"
    );
    guest.poweroff(EXIT_TIMEOUT).unwrap();
    backend.stop();

    // QEMU agrees: a clean image holding what the guest saw.
    qemu_img(&["check", &path("top.qcow2")]);
    qemu_img(&["convert", "-O", "raw", &path("top.qcow2"), &path("top.raw")]);
    let top = p("top.raw");
    assert_eq!(host_md5(&top, 0, 4096), first);
    assert_eq!(host_md5(&top, 3, 1), pat0);
    assert_eq!(host_md5(&top, 8192, 256), pat);
    assert_eq!(host_md5(&top, 4, 4092), host_md5(&p("base.raw"), 4, 4092));
    // Only what was written took space in the top image.
    let info = qemu_img(&["info", "--output=json", &path("top.qcow2")]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let used = v["actual-size"].as_u64().unwrap();
    assert!(used < 4 << 20, "top image uses {used} bytes");
}
