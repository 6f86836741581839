//! keel's Rust vhost-user-blk frontend against keel's backend, in process,
//! no guest: a pattern written through the virtqueues, flushed and read back
//! equals the image file; a request past the end of the disk gets IOERR and
//! the backend keeps serving.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // byte patterns truncate on purpose

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use keel_vhost::frontend::{Completion, Frontend, FrontendConfig, Queue, RequestKind, SECTOR};
use keel_vhost::{
    create_raw_volume, serve_disk, DiskOptions, DiskServeOptions, Provisioning, StopHandle,
};

const DISK: u64 = 8 << 20;
const BLOCK: u32 = 64 << 10;

fn one(
    q: &mut Queue,
    kind: RequestKind,
    sector: u64,
    data: Option<&[u8]>,
    len: u32,
) -> (u8, Vec<u8>) {
    let slot = q.push(kind, sector, len).unwrap();
    if let Some(d) = data {
        q.buffer_mut(slot)[..d.len()].copy_from_slice(d);
    }
    q.kick().unwrap();
    let mut done: Vec<Completion> = Vec::new();
    q.wait(&mut done).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].slot, slot);
    let buf = q.buffer_mut(slot)[..len as usize].to_vec();
    (done[0].status, buf)
}

fn wait_for_socket(p: &Path) {
    for _ in 0..500 {
        if p.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("socket {} never appeared", p.display());
}

/// Serves `opts` on a thread; returns once its socket is there.
fn start(
    opts: DiskServeOptions,
) -> (
    StopHandle,
    std::thread::JoinHandle<Result<(), keel_vhost::ServeDiskError>>,
) {
    let socket = opts.socket.clone();
    let stop = StopHandle::new();
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || serve_disk(&opts, &stop))
    };
    wait_for_socket(&socket);
    (stop, server)
}

#[test]
fn pattern_roundtrip_and_out_of_range_is_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let socket = dir.path().join("blk.sock");
    create_raw_volume(&image, DISK, Provisioning::Thin).unwrap();
    let mut disk = DiskOptions::new(&image);
    disk.direct = false;
    let opts = DiskServeOptions {
        socket: socket.clone(),
        disk,
        queues: 2,
        serial: "frontend-test".into(),
        cbt_granularity: None,
        control: None,
    };
    let (stop, server) = start(opts);

    let mut fe = Frontend::connect(
        &socket,
        FrontendConfig {
            queues: 2,
            queue_depth: 8,
            max_request: BLOCK,
        },
    )
    .unwrap();
    assert_eq!(fe.capacity_sectors(), DISK / SECTOR);
    let mut queues = fe.take_queues();
    assert_eq!(queues.len(), 2);

    // A pattern over the whole disk, alternating queues, then flush.
    let blocks = DISK / u64::from(BLOCK);
    for b in 0..blocks {
        let q = &mut queues[(b % 2) as usize];
        let data: Vec<u8> = (0..BLOCK).map(|i| (i as u64 * 7 + b * 13) as u8).collect();
        let (st, _) = one(
            q,
            RequestKind::Write,
            b * u64::from(BLOCK) / SECTOR,
            Some(&data),
            BLOCK,
        );
        assert_eq!(st, 0, "write block {b}");
    }
    assert_eq!(one(&mut queues[0], RequestKind::Flush, 0, None, 0).0, 0);

    // The file holds the pattern.
    let file = std::fs::File::open(&image).unwrap();
    for b in 0..blocks {
        let mut got = vec![0u8; BLOCK as usize];
        file.read_exact_at(&mut got, b * u64::from(BLOCK)).unwrap();
        let want: Vec<u8> = (0..BLOCK).map(|i| (i as u64 * 7 + b * 13) as u8).collect();
        assert!(got == want, "file block {b} differs");
    }
    // Read back through the virtqueues, several in flight at once.
    let q = &mut queues[1];
    let mut slots = Vec::new();
    for b in 0..8u64 {
        slots.push((
            q.push(RequestKind::Read, b * u64::from(BLOCK) / SECTOR, BLOCK)
                .unwrap(),
            b,
        ));
    }
    q.kick().unwrap();
    let mut done = Vec::new();
    let mut seen = 0;
    while seen < slots.len() {
        q.wait(&mut done).unwrap();
        for c in &done {
            assert_eq!(c.status, 0);
            let b = slots.iter().find(|(s, _)| *s == c.slot).unwrap().1;
            let want: Vec<u8> = (0..BLOCK).map(|i| (i as u64 * 7 + b * 13) as u8).collect();
            assert!(
                q.buffer_mut(c.slot)[..BLOCK as usize] == want[..],
                "read block {b}"
            );
            seen += 1;
        }
    }

    // Past the end: IOERR (1), not a crash; straddling the end too.
    let last = DISK / SECTOR;
    assert_eq!(
        one(&mut queues[0], RequestKind::Read, last, None, 4096).0,
        1
    );
    assert_eq!(
        one(
            &mut queues[0],
            RequestKind::Write,
            last - 1,
            Some(&[9u8; 4096]),
            4096
        )
        .0,
        1
    );
    assert_eq!(
        one(&mut queues[0], RequestKind::Read, u64::MAX / 2, None, 512).0,
        1
    );
    // Still serving afterwards, and the last good sector is unchanged.
    let (st, buf) = one(&mut queues[0], RequestKind::Read, last - 8, None, 4096);
    assert_eq!(st, 0);
    let mut want = vec![0u8; 4096];
    file.read_exact_at(&mut want, DISK - 4096).unwrap();
    assert_eq!(buf, want);

    drop(queues);
    drop(fe);
    stop.stop();
    server.join().unwrap().unwrap();
}

/// GET_VRING_BASE (QEMU sends it when the VM pauses) answers only once
/// every request the backend took from the ring has completed, so the base
/// it returns equals the used index, and each completed write has set its
/// changed-block bits: the point-in-time cut of a paused VM's disk.
#[test]
fn ring_stop_completes_the_requests_taken_before_answering() {
    use vhost::VhostBackend;
    const WRITE: u32 = 256 << 10;
    const DEPTH: u16 = 32;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let socket = dir.path().join("blk.sock");
    let control = dir.path().join("blk.ctl");
    create_raw_volume(&image, DISK * 2, Provisioning::Thin).unwrap();
    let opts = DiskServeOptions {
        socket: socket.clone(),
        disk: DiskOptions::new(&image),
        queues: 1,
        serial: "stop-test".into(),
        cbt_granularity: Some(64 << 10),
        control: Some(control.clone()),
    };
    let (stop, server) = start(opts);
    let mut fe = Frontend::connect(
        &socket,
        FrontendConfig {
            queues: 1,
            queue_depth: DEPTH,
            max_request: WRITE,
        },
    )
    .unwrap();
    let mut q = fe.take_queues().pop().unwrap();
    for i in 0..u64::from(DEPTH) {
        let slot = q
            .push(RequestKind::Write, i * u64::from(WRITE) / SECTOR, WRITE)
            .unwrap();
        q.buffer_mut(slot).fill(0x5a);
    }
    q.kick().unwrap();
    let base = fe.connection().get_vring_base(0).unwrap();
    let mut done = Vec::new();
    q.reap(&mut done).unwrap();
    assert_eq!(
        done.len() as u32,
        base,
        "every request taken before the stop is completed when it answers"
    );
    assert!(done.iter().all(|c| c.status == 0));
    let mut ctl = keel_vhost::control::Client::connect(&control).unwrap();
    ctl.drain().unwrap();
    let marked = ctl.status().unwrap().bitmaps[0].dirty_granules;
    assert_eq!(
        marked,
        u64::from(base) * u64::from(WRITE / (64 << 10)),
        "completed writes are marked, untaken ones not"
    );
    drop(q);
    drop(fe);
    stop.stop();
    server.join().unwrap().unwrap();
}

/// A stop reaches a server waiting for its first frontend even when its
/// socket's directory was removed under it (it used to wake accept() by
/// connecting to the socket path, and then never returned).
#[test]
fn stop_ends_a_server_whose_directory_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("run");
    std::fs::create_dir(&sub).unwrap();
    let image = dir.path().join("disk.raw");
    let socket = sub.join("blk.sock");
    create_raw_volume(&image, DISK, Provisioning::Thin).unwrap();
    let opts = DiskServeOptions {
        socket: socket.clone(),
        disk: DiskOptions::new(&image),
        queues: 1,
        serial: "gone".into(),
        cbt_granularity: None,
        control: None,
    };
    let stop = StopHandle::new();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let stop = stop.clone();
        std::thread::spawn(move || tx.send(serve_disk(&opts, &stop).is_ok()));
    }
    wait_for_socket(&socket);
    std::fs::remove_dir_all(&sub).unwrap();
    stop.stop();
    // A bound on a hang, not a timing check: a stop returns at once.
    let clean = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the server returned after the stop");
    assert!(clean, "a stopped server ends cleanly");
}

/// A qcow2 disk through the virtqueues: requests inside allocated runs go
/// to io_uring translated; one spanning an allocated, a new and another
/// allocated cluster at non-contiguous host offsets, reads of holes and a
/// discard take the slow path; a flush writes the map back. After the
/// stop, `qemu-img` finds a clean image holding the same bytes.
#[test]
fn qcow2_requests_fast_and_slow_path_through_the_virtqueues() {
    const CLUSTER: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("blk.sock");
    keel_vhost::qcow2::create(
        &image,
        &keel_vhost::qcow2::CreateOptions {
            size: DISK,
            cluster_size: CLUSTER,
            backing: None,
        },
    )
    .unwrap();
    let mut disk = DiskOptions::new(&image);
    disk.format = keel_vhost::ImageFormat::Qcow2;
    disk.direct = true;
    let opts = DiskServeOptions {
        socket: socket.clone(),
        disk,
        queues: 1,
        serial: "qcow2-test".into(),
        cbt_granularity: Some(CLUSTER),
        control: None,
    };
    let (stop, server) = start(opts);
    let mut fe = Frontend::connect(
        &socket,
        FrontendConfig {
            queues: 1,
            queue_depth: 4,
            max_request: 3 * CLUSTER as u32,
        },
    )
    .unwrap();
    assert_eq!(fe.capacity_sectors(), DISK / SECTOR);
    let q = &mut fe.take_queues()[0];
    let mut model = vec![0u8; DISK as usize];
    let pattern = |len: usize, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    let write = |q: &mut Queue, model: &mut Vec<u8>, at: u64, len: usize, seed: u8| {
        let data = pattern(len, seed);
        let (st, _) = one(q, RequestKind::Write, at / SECTOR, Some(&data), len as u32);
        assert_eq!(st, 0, "write at {at}");
        model[at as usize..at as usize + len].copy_from_slice(&data);
    };
    // Clusters 7 then 5 are allocated in that order: host offsets out of
    // guest order, so 5..=7 is not one host run once 6 is added.
    write(q, &mut model, 7 * CLUSTER + 4096, 4096, 1);
    write(q, &mut model, 5 * CLUSTER, 8192, 2);
    write(
        q,
        &mut model,
        5 * CLUSTER + 4096,
        3 * CLUSTER as usize - 8192,
        3,
    );
    // In place, inside one allocated cluster (the translated fast path).
    write(q, &mut model, 6 * CLUSTER + 512, 1024, 4);
    let read = |q: &mut Queue, at: u64, len: usize| {
        let (st, got) = one(q, RequestKind::Read, at / SECTOR, None, len as u32);
        assert_eq!(st, 0, "read at {at}");
        got
    };
    for (at, len) in [
        (5 * CLUSTER, 3 * CLUSTER as usize),
        (6 * CLUSTER, 4096),
        (0, 2 * CLUSTER as usize),
        (4 * CLUSTER + 4096, CLUSTER as usize),
    ] {
        assert!(
            read(q, at, len) == model[at as usize..at as usize + len],
            "{at}+{len}"
        );
    }
    assert_eq!(one(q, RequestKind::Flush, 0, None, 0).0, 0);
    drop(fe);
    stop.stop();
    server.join().unwrap().unwrap();

    keel_testkit::run(&["qemu-img", "check", image.to_str().unwrap()]).unwrap();
    let raw = dir.path().join("disk.raw");
    keel_testkit::run(&[
        "qemu-img",
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "qemu-img reads what was written"
    );
}

/// A hook that takes a ticket per modifying request, like synchronous
/// replication does, and holds completions at its gate.
#[derive(Clone, Default)]
struct Gated(std::sync::Arc<keel_vhost::CompletionGate>);

impl keel_vhost::WriteHook for Gated {
    fn on_write(&self, _: u64, _: u64, _: &keel_vhost::WriteData<'_>) {
        self.0.issue();
    }
    fn on_flush(&self) {
        self.0.issue();
    }
    fn gate(&self) -> Option<&keel_vhost::CompletionGate> {
        Some(&self.0)
    }
}

/// Completions a gate holds reach the guest only when released, up to the
/// released ticket; reads pass held writes; an open gate holds nothing.
#[test]
fn held_writes_complete_when_their_gate_releases_them_and_reads_pass() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let socket = dir.path().join("blk.sock");
    create_raw_volume(&image, DISK, Provisioning::Thin).unwrap();
    let mut disk = DiskOptions::new(&image);
    disk.direct = false;
    let shared = std::sync::Arc::new(keel_vhost::DiskShared::new(
        keel_vhost::RawDisk::open(disk).unwrap(),
        "gate-test",
    ));
    let hook = Gated::default();
    let gate = hook.0.clone();
    let stop = StopHandle::new();
    let server = {
        let (stop, socket) = (stop.clone(), socket.clone());
        std::thread::spawn(move || {
            let sc = keel_vhost::ServeConfig {
                socket,
                queues: keel_vhost::QueueConfig::new(1),
            };
            keel_vhost::serve(&sc, shared, hook, &stop)
        })
    };
    wait_for_socket(&socket);
    let mut fe = Frontend::connect(
        &socket,
        FrontendConfig {
            queues: 1,
            queue_depth: 8,
            max_request: 4096,
        },
    )
    .unwrap();
    let mut q = fe.take_queues().pop().unwrap();
    let mut done: Vec<Completion> = Vec::new();
    let settle = || std::thread::sleep(Duration::from_millis(300));

    // Two writes and a flush: done on the disk, held from the guest.
    for (i, kind) in [RequestKind::Write, RequestKind::Write, RequestKind::Flush]
        .into_iter()
        .enumerate()
    {
        let slot = q.push(kind, i as u64 * 8, 4096).unwrap();
        q.buffer_mut(slot).fill(0x40 + i as u8);
    }
    q.kick().unwrap();
    let wait_issued = |n: u64| {
        for _ in 0..500 {
            if gate.issued() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the hook saw {} of {n} requests", gate.issued());
    };
    wait_issued(3);
    settle();
    q.reap(&mut done).unwrap();
    assert!(done.is_empty(), "held: {done:?}");
    let mut on_disk = [0u8; 4];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut on_disk, 4096)
        .unwrap();
    assert_eq!(on_disk, [0x41; 4], "the write itself is done");

    // A read is not held behind them.
    let (status, data) = one(&mut q, RequestKind::Read, 8, None, 4096);
    assert_eq!((status, &data[..4]), (0, &[0x41u8; 4][..]));

    // Tickets follow completion order (the flush's fsync may finish
    // first): releasing ticket 2 completes two of the three.
    gate.release(2);
    let mut got = Vec::new();
    while got.len() < 2 {
        q.wait(&mut done).unwrap();
        got.extend(done.iter().map(|c| (c.slot, c.status)));
    }
    settle();
    done.clear();
    q.reap(&mut done).unwrap();
    assert!(done.is_empty(), "the third stays held: {done:?}");
    assert!(got.iter().all(|&(_, s)| s == 0));
    gate.release(3);
    q.wait(&mut done).unwrap();
    assert_eq!(done.len(), 1);

    // Open: a write completes at once, without a release.
    gate.set_open(true);
    let (status, _) = one(&mut q, RequestKind::Write, 64, Some(&[7u8; 4096]), 4096);
    assert_eq!(status, 0);
    assert_eq!(gate.pending(), 0);

    drop(q);
    drop(fe);
    stop.stop();
    server.join().unwrap().unwrap();
}
