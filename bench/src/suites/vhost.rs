//! `vhost`: keel's vhost-user-blk backend against qemu-storage-daemon, the
//! peer a user would otherwise run, side by side on the same raw file:
//! both with O_DIRECT (`keel vhost-blk --direct`; qsd `cache.direct=on`,
//! `aio=native`), one queue, driven by the same in-process Rust frontend
//! (`keel_vhost::frontend`: the virtqueues a guest driver would fill, no
//! guest CPU in the way). Random 4 KiB reads and writes at QD32 and QD1,
//! sequential 128 KiB reads and writes at QD8, each for a fixed time.
//!
//! Both backends run at once, each with its own frontend; every workload
//! is run in alternating rounds (keel, qsd, qsd, keel, ...) so drift and
//! noise of the shared machine hit both sides alike, and the median of
//! each side's rounds is compared. The image's page cache is dropped after
//! it is written, so neither side starts with a cached file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_vhost::frontend::{Completion, Frontend, FrontendConfig, Queue, RequestKind};

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "vhost",
    about: "vhost-user-blk: keel vs qemu-storage-daemon (O_DIRECT, same file, Rust frontend)",
    run,
};

const SECTOR: u64 = 512;
const QD_MAX: u16 = 32;
const MAX_REQUEST: u32 = 128 << 10;

fn err(e: impl std::error::Error + Send + Sync + 'static) -> BenchError {
    BenchError::Io(std::io::Error::other(e))
}

/// A backend process, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(daemon: &mut Daemon, socket: &Path, who: &str) -> Result<(), BenchError> {
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            return Err(BenchError::Io(std::io::Error::other(format!(
                "{who} exited before serving: {status}"
            ))));
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(BenchError::Io(std::io::Error::other(format!(
                "{who} did not create {}",
                socket.display()
            ))));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The keel binary that serves the disk: this one, or `KEEL_BENCH_VHOST_BIN`
/// to measure another build (e.g. before and after a change) against the
/// same peer with the same harness.
fn keel_binary() -> Result<PathBuf, BenchError> {
    match std::env::var_os("KEEL_BENCH_VHOST_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(std::env::current_exe()?),
    }
}

fn keel(image: &Path, socket: &Path) -> Result<Daemon, BenchError> {
    let mut d = Daemon(
        Command::new(keel_binary()?)
            .arg("vhost-blk")
            .arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .arg("--direct")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_socket(&mut d, socket, "keel vhost-blk")?;
    Ok(d)
}

fn qsd(image: &Path, socket: &Path) -> Result<Daemon, BenchError> {
    let blockdev = format!(
        "driver=file,node-name=f,filename={},cache.direct=on,aio=native",
        image.display()
    );
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=1",
        socket.display()
    );
    let mut d = Daemon(
        Command::new("qemu-storage-daemon")
            .args(["--blockdev", &blockdev, "--export", &export])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_socket(&mut d, socket, "qemu-storage-daemon")?;
    Ok(d)
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    kind: RequestKind,
    block: u32,
    depth: u16,
    random: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4 KiB random read QD32",
        kind: RequestKind::Read,
        block: 4096,
        depth: 32,
        random: true,
    },
    Workload {
        name: "4 KiB random write QD32",
        kind: RequestKind::Write,
        block: 4096,
        depth: 32,
        random: true,
    },
    Workload {
        name: "4 KiB random read QD1",
        kind: RequestKind::Read,
        block: 4096,
        depth: 1,
        random: true,
    },
    Workload {
        name: "128 KiB sequential read QD8",
        kind: RequestKind::Read,
        block: 128 << 10,
        depth: 8,
        random: false,
    },
    Workload {
        name: "128 KiB sequential write QD8",
        kind: RequestKind::Write,
        block: 128 << 10,
        depth: 8,
        random: false,
    },
];

/// Runs `w` for `time`; returns completed requests per second.
fn drive(q: &mut Queue, capacity: u64, w: Workload, time: Duration) -> Result<f64, BenchError> {
    let blocks = capacity * SECTOR / u64::from(w.block);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next_seq = 0u64;
    let mut next = || {
        let b = if w.random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % blocks
        } else {
            next_seq = (next_seq + 1) % blocks;
            next_seq
        };
        b * u64::from(w.block) / SECTOR
    };
    let mut done: Vec<Completion> = Vec::with_capacity(usize::from(QD_MAX));
    let mut in_flight = 0u16;
    let mut completed = 0u64;
    let start = Instant::now();
    loop {
        let filling = start.elapsed() < time;
        while filling && in_flight < w.depth {
            let slot = q.push(w.kind, next(), w.block).map_err(err)?;
            if w.kind == RequestKind::Write {
                q.buffer_mut(slot)[..8].copy_from_slice(&completed.to_le_bytes());
            }
            in_flight += 1;
        }
        q.kick().map_err(err)?;
        if in_flight == 0 {
            break;
        }
        q.wait(&mut done).map_err(err)?;
        for c in &done {
            if c.status != 0 {
                return Err(BenchError::Io(std::io::Error::other(format!(
                    "{}: request failed with virtio status {}",
                    w.name, c.status
                ))));
            }
        }
        let n = u16::try_from(done.len()).unwrap_or(u16::MAX);
        in_flight = in_flight.saturating_sub(n);
        completed += u64::from(n);
    }
    if w.kind == RequestKind::Write {
        q.push(RequestKind::Flush, 0, 0).map_err(err)?;
        q.kick().map_err(err)?;
        q.wait(&mut done).map_err(err)?;
    }
    Ok(completed as f64 / start.elapsed().as_secs_f64())
}

/// One backend, connected: its frontend (kept alive) and its queue.
struct Side {
    _daemon: Daemon,
    _frontend: Frontend,
    queue: Queue,
    capacity: u64,
}

fn connect(daemon: Daemon, socket: &Path) -> Result<Side, BenchError> {
    let mut frontend = Frontend::connect(
        socket,
        FrontendConfig {
            queues: 1,
            queue_depth: QD_MAX,
            max_request: MAX_REQUEST,
        },
    )
    .map_err(err)?;
    let capacity = frontend.capacity_sectors();
    let queue = frontend
        .take_queues()
        .into_iter()
        .next()
        .ok_or_else(|| BenchError::Io(std::io::Error::other("the backend offered no queue")))?;
    Ok(Side {
        _daemon: daemon,
        _frontend: frontend,
        queue,
        capacity,
    })
}

/// Median of the rounds of one side.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Drops the cached pages of `image` (written just before), so both
/// backends start from the same, uncached file.
fn drop_cache(image: &Path) -> Result<(), BenchError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image)?;
    f.sync_all()?;
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(BenchError::Io(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    // Rounds per side and workload (even: each side goes first as often).
    let (size, time, rounds): (u64, Duration, usize) = match scale {
        Scale::Quick => (256 << 20, Duration::from_secs(1), 4),
        Scale::Full => (4 << 30, Duration::from_secs(5), 6),
    };
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from);
    let scratch = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in(base)?;
    let image = scratch.path().join("disk.raw");
    // Allocated on disk, so reads hit blocks rather than holes.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&image)?;
        let chunk = vec![0xA5u8; 1 << 20];
        for _ in 0..size >> 20 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    drop_cache(&image)?;
    let keel_socket = scratch.path().join("keel.sock");
    let qsd_socket = scratch.path().join("qsd.sock");
    let mut keel_side = connect(keel(&image, &keel_socket)?, &keel_socket)?;
    let mut qsd_side = connect(qsd(&image, &qsd_socket)?, &qsd_socket)?;
    let mut results = Vec::with_capacity(WORKLOADS.len());
    for w in WORKLOADS {
        let (mut k, mut q) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // keel first in even rounds, qsd first in odd ones (ABBA).
            for keel_turn in [round % 2 == 0, round % 2 == 1] {
                let (side, out) = if keel_turn {
                    (&mut keel_side, &mut k)
                } else {
                    (&mut qsd_side, &mut q)
                };
                out.push(drive(&mut side.queue, side.capacity, *w, time)?);
            }
        }
        let (k, q) = (median(&mut k), median(&mut q));
        let (unit, scale) = if w.block >= 128 << 10 {
            ("MB/s", f64::from(w.block) / 1e6)
        } else {
            ("IOPS", 1.0)
        };
        results.push(
            Measurement::new(w.name, unit, true, k * scale)
                .with_peer("qemu-storage-daemon (aio=native)", q * scale),
        );
    }
    Ok(results)
}
