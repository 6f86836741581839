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
//! it is written, so neither side starts with a cached file. CPU per I/O
//! is the backend process's CPU time (all threads, from schedstat) over
//! the requests it completed in the round.
//!
//! Further rows: QD1 latency against a plain io_uring loop on the same
//! file (the floor); each backend's resident memory; qcow2 (below); a
//! RAM-backed disk (tmpfs, page cache: the backend's own cost) at QD64;
//! two queues on two workers against one; CBT on against off.
//!
//! qcow2 rows: keel's qcow2 against qsd's qcow2 driver (each on its own
//! copy of one fully allocated image: two writers must not share qcow2
//! metadata) and against keel on the raw file, in rotating order; then
//! allocating writes, each round on fresh empty images (qcow2 for both,
//! a sparse raw file for keel raw).

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
const QD_MAX: u16 = 64;
const MAX_REQUEST: u32 = 128 << 10;

fn err(e: impl std::error::Error + Send + Sync + 'static) -> BenchError {
    BenchError::Io(std::io::Error::other(e))
}

fn other(msg: String) -> BenchError {
    BenchError::Io(std::io::Error::other(msg))
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
            return Err(other(format!("{who} exited before serving: {status}")));
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(other(format!("{who} did not create {}", socket.display())));
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

/// How a backend serves its image.
#[derive(Clone, Copy)]
struct Serve {
    format: &'static str,
    /// O_DIRECT (else the page cache: a RAM-backed disk).
    direct: bool,
    queues: u16,
    /// keel only: track changed blocks.
    cbt: bool,
}

const DIRECT_RAW: Serve = Serve {
    format: "raw",
    direct: true,
    queues: 1,
    cbt: false,
};

fn keel(image: &Path, socket: &Path, how: Serve) -> Result<Daemon, BenchError> {
    let mut cmd = Command::new(keel_binary()?);
    cmd.arg("vhost-blk")
        .arg("--socket")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .args(["--format", how.format, "--queues", &how.queues.to_string()]);
    if how.direct {
        cmd.arg("--direct");
    }
    if how.cbt {
        cmd.args(["--cbt-granularity", "65536"]);
    }
    let mut d = Daemon(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    wait_socket(&mut d, socket, "keel vhost-blk")?;
    Ok(d)
}

fn qsd(image: &Path, socket: &Path, how: Serve) -> Result<Daemon, BenchError> {
    // Buffered I/O goes through io_uring too (native AIO needs O_DIRECT).
    let (direct, aio) = if how.direct {
        ("on", "native")
    } else {
        ("off", "io_uring")
    };
    let blockdev = format!(
        "driver=file,node-name=f,filename={},cache.direct={direct},aio={aio}",
        image.display()
    );
    let mut args = vec!["--blockdev".to_owned(), blockdev];
    let node = if how.format == "qcow2" {
        args.extend([
            "--blockdev".into(),
            "driver=qcow2,node-name=q,file=f".into(),
        ]);
        "q"
    } else {
        "f"
    };
    args.extend([
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues={}",
            socket.display(),
            how.queues
        ),
    ]);
    let mut d = Daemon(
        Command::new("qemu-storage-daemon")
            .args(&args)
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

const fn random4k(name: &'static str, kind: RequestKind, depth: u16) -> Workload {
    Workload {
        name,
        kind,
        block: 4096,
        depth,
        random: true,
    }
}

const RANDREAD_QD32: Workload = random4k("4 KiB random read QD32", RequestKind::Read, 32);
const RANDWRITE_QD32: Workload = random4k("4 KiB random write QD32", RequestKind::Write, 32);
const RANDREAD_QD1: Workload = random4k("4 KiB random read QD1", RequestKind::Read, 1);
const SEQREAD_QD8: Workload = Workload {
    name: "128 KiB sequential read QD8",
    kind: RequestKind::Read,
    block: 128 << 10,
    depth: 8,
    random: false,
};

const WORKLOADS: &[Workload] = &[
    RANDREAD_QD32,
    RANDWRITE_QD32,
    RANDREAD_QD1,
    SEQREAD_QD8,
    Workload {
        name: "128 KiB sequential write QD8",
        kind: RequestKind::Write,
        block: 128 << 10,
        depth: 8,
        random: false,
    },
];

/// Block numbers of a workload (xorshift or sequential), in sectors.
struct Offsets {
    blocks: u64,
    block: u64,
    random: bool,
    x: u64,
    seq: u64,
}

impl Offsets {
    fn new(capacity_bytes: u64, block: u32, random: bool, seed: u64) -> Self {
        Self {
            blocks: (capacity_bytes / u64::from(block)).max(1),
            block: u64::from(block),
            random,
            x: 0x2545_F491_4F6C_DD1D ^ seed,
            seq: 0,
        }
    }

    fn next_sector(&mut self) -> u64 {
        let b = if self.random {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            self.x % self.blocks
        } else {
            self.seq = (self.seq + 1) % self.blocks;
            self.seq
        };
        b * self.block / SECTOR
    }
}

/// Runs `w` on `q` for `time`; returns the requests completed.
fn drive(
    q: &mut Queue,
    capacity: u64,
    w: Workload,
    time: Duration,
    seed: u64,
) -> Result<u64, BenchError> {
    let mut offsets = Offsets::new(capacity * SECTOR, w.block, w.random, seed);
    let mut done: Vec<Completion> = Vec::with_capacity(usize::from(QD_MAX));
    let mut in_flight = 0u16;
    let mut completed = 0u64;
    let start = Instant::now();
    loop {
        let filling = start.elapsed() < time;
        while filling && in_flight < w.depth {
            let slot = q
                .push(w.kind, offsets.next_sector(), w.block)
                .map_err(err)?;
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
                return Err(other(format!(
                    "{}: request failed with virtio status {}",
                    w.name, c.status
                )));
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
    Ok(completed)
}

/// CPU time a process used so far, all threads, in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A `/proc/PID/status` memory field (`VmRSS`, `RssAnon`, ...) in MiB.
fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// One backend, connected: its frontend (kept alive) and its queues.
struct Side {
    daemon: Daemon,
    _frontend: Frontend,
    queues: Vec<Queue>,
    capacity: u64,
}

/// A round's result: requests per second and backend CPU µs per request.
#[derive(Clone, Copy, Default)]
struct Rate {
    per_sec: f64,
    cpu_us: f64,
}

impl Side {
    fn pid(&self) -> u32 {
        self.daemon.0.id()
    }

    /// Runs `w` on the first `queues` queues at once (a thread each).
    fn run(&mut self, w: Workload, time: Duration, queues: usize) -> Result<Rate, BenchError> {
        let (pid, capacity) = (self.pid(), self.capacity);
        let cpu0 = cpu_ns(pid);
        let start = Instant::now();
        let n = queues.min(self.queues.len());
        let completed: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = self.queues[..n]
                .iter_mut()
                .enumerate()
                .map(|(i, q)| s.spawn(move || drive(q, capacity, w, time, i as u64)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| other("driver thread panicked".into()))?
                })
                .sum::<Result<u64, BenchError>>()
        })?;
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_ns(pid).saturating_sub(cpu0) as f64;
        Ok(Rate {
            per_sec: completed as f64 / secs,
            cpu_us: if completed == 0 {
                0.0
            } else {
                cpu / 1e3 / completed as f64
            },
        })
    }
}

fn connect(daemon: Daemon, socket: &Path, queues: u16) -> Result<Side, BenchError> {
    let mut frontend = Frontend::connect(
        socket,
        FrontendConfig {
            queues,
            queue_depth: QD_MAX,
            max_request: MAX_REQUEST,
        },
    )
    .map_err(err)?;
    let capacity = frontend.capacity_sectors();
    let queues = frontend.take_queues();
    if queues.is_empty() {
        return Err(other("the backend offered no queue".into()));
    }
    Ok(Side {
        daemon,
        _frontend: frontend,
        queues,
        capacity,
    })
}

fn start_keel(image: &Path, socket: &Path, how: Serve) -> Result<Side, BenchError> {
    connect(keel(image, socket, how)?, socket, how.queues)
}

fn start_qsd(image: &Path, socket: &Path, how: Serve) -> Result<Side, BenchError> {
    connect(qsd(image, socket, how)?, socket, how.queues)
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

/// Medians of rounds of `f(side index)`, the order of the sides reversed
/// every other round so each goes first as often.
fn rounds(
    n: usize,
    rounds: usize,
    mut f: impl FnMut(usize) -> Result<Rate, BenchError>,
) -> Result<Vec<Rate>, BenchError> {
    let mut res = vec![(Vec::new(), Vec::new()); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = if round % 2 == 0 { k } else { n - 1 - k };
            let r = f(i)?;
            res[i].0.push(r.per_sec);
            res[i].1.push(r.cpu_us);
        }
    }
    Ok(res
        .iter_mut()
        .map(|(a, b)| Rate {
            per_sec: median(a),
            cpu_us: median(b),
        })
        .collect())
}

/// `w` on each side (one queue), in rotating rounds.
fn compare(
    sides: &mut [&mut Side],
    w: Workload,
    time: Duration,
    n: usize,
) -> Result<Vec<Rate>, BenchError> {
    rounds(sides.len(), n, |i| sides[i].run(w, time, 1))
}

/// Converts a result per second into the row's unit.
fn unit(w: &Workload) -> (&'static str, f64) {
    if w.block >= 128 << 10 {
        ("MB/s", f64::from(w.block) / 1e6)
    } else {
        ("IOPS", 1.0)
    }
}

/// A throughput row and, for 4 KiB work, a CPU-per-I/O row.
fn rows(
    name: &str,
    w: &Workload,
    ours: Rate,
    peer_name: &str,
    peer: Rate,
    cpu: bool,
) -> Vec<Measurement> {
    let (unit, scale) = unit(w);
    let mut out = vec![Measurement::new(name, unit, true, ours.per_sec * scale)
        .with_peer(peer_name, peer.per_sec * scale)];
    if cpu {
        out.push(
            Measurement::new(
                &format!("{name}, backend CPU per I/O"),
                "us",
                false,
                ours.cpu_us,
            )
            .with_peer(peer_name, peer.cpu_us),
        );
    }
    out
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

/// Writes `size` bytes of a non-zero pattern (allocated blocks, not holes).
fn fill(image: &Path, size: u64) -> Result<(), BenchError> {
    use std::io::Write;
    let mut f = std::fs::File::create(image)?;
    let chunk = vec![0xA5u8; 1 << 20];
    for _ in 0..size >> 20 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Random 4 KiB reads at QD1 with nothing but io_uring (the floor a
/// backend's QD1 latency is measured against), O_DIRECT or through the
/// page cache; returns reads per second.
fn plain_uring_qd1(image: &Path, time: Duration, direct: bool) -> Result<Rate, BenchError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(image)?;
    let mut offsets = Offsets::new(f.metadata()?.len(), 4096, true, 0);
    let layout = std::alloc::Layout::from_size_align(4096, 4096).map_err(err)?;
    // SAFETY: non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return Err(other("out of memory".into()));
    }
    let mut ring = io_uring::IoUring::new(8)?;
    let fd = io_uring::types::Fd(f.as_raw_fd());
    let start = Instant::now();
    let mut done = 0u64;
    let result = loop {
        if start.elapsed() >= time {
            break Ok(());
        }
        let sqe = io_uring::opcode::Read::new(fd, buf, 4096)
            .offset(offsets.next_sector() * SECTOR)
            .build();
        // SAFETY: `buf` outlives the request (we wait for it right away).
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            break Err(other("io_uring queue full".into()));
        }
        if let Err(e) = ring.submit_and_wait(1) {
            break Err(BenchError::Io(e));
        }
        match ring.completion().next() {
            Some(c) if c.result() == 4096 => done += 1,
            Some(c) => {
                break Err(other(format!(
                    "plain io_uring read returned {}",
                    c.result()
                )))
            }
            None => break Err(other("no completion".into())),
        }
    };
    // SAFETY: allocated above with `layout`; the ring holds no request.
    unsafe { std::alloc::dealloc(buf, layout) };
    result?;
    Ok(Rate {
        per_sec: done as f64 / start.elapsed().as_secs_f64(),
        cpu_us: 0.0,
    })
}

fn qemu_img(args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new("qemu-img").args(args).output()?;
    if !out.status.success() {
        return Err(other(format!(
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str, BenchError> {
    p.to_str()
        .ok_or_else(|| other("non-UTF-8 scratch path".into()))
}

/// The qcow2 rows (see the module docs); `raw` is keel on the raw image.
fn qcow2_rows(
    scratch: &Path,
    raw_image: &Path,
    raw: &mut Side,
    size: u64,
    time: Duration,
    n: usize,
) -> Result<Vec<Measurement>, BenchError> {
    let qcow2 = Serve {
        format: "qcow2",
        ..DIRECT_RAW
    };
    let (kimg, qimg) = (scratch.join("keel.qcow2"), scratch.join("qsd.qcow2"));
    for img in [&kimg, &qimg] {
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            path_str(raw_image)?,
            path_str(img)?,
        ])?;
        drop_cache(img)?;
    }
    let mut keel_side = start_keel(&kimg, &scratch.join("kq.sock"), qcow2)?;
    let mut qsd_side = start_qsd(&qimg, &scratch.join("qq.sock"), qcow2)?;
    let mut out = Vec::new();
    for w in [RANDREAD_QD32, RANDWRITE_QD32, SEQREAD_QD8] {
        let m = compare(&mut [&mut keel_side, &mut qsd_side, &mut *raw], w, time, n)?;
        let name = format!("qcow2 {}", w.name);
        let cpu = w.block == 4096;
        out.extend(rows(
            &name,
            &w,
            m[0],
            "qemu-storage-daemon qcow2",
            m[1],
            cpu,
        ));
        out.extend(rows(
            &format!("{name} vs raw"),
            &w,
            m[0],
            "keel raw",
            m[2],
            false,
        ));
    }
    drop((keel_side, qsd_side));
    // Allocating writes: fresh empty images every round.
    let w = Workload {
        name: "4 KiB random write QD32, allocating",
        ..RANDWRITE_QD32
    };
    let sizearg = size.to_string();
    let imgs = [
        scratch.join("ak.qcow2"),
        scratch.join("aq.qcow2"),
        scratch.join("ar.raw"),
    ];
    let m = rounds(3, n, |i| {
        let img = &imgs[i];
        let _ = std::fs::remove_file(img);
        let format = if i == 2 { "raw" } else { "qcow2" };
        qemu_img(&["create", "-q", "-f", format, path_str(img)?, &sizearg])?;
        let sock = scratch.join(format!("a{i}.sock"));
        let how = Serve {
            format,
            ..DIRECT_RAW
        };
        let mut side = if i == 1 {
            start_qsd(img, &sock, how)?
        } else {
            start_keel(img, &sock, how)?
        };
        side.run(w, time, 1)
    })?;
    let name = format!("qcow2 {}", w.name);
    out.extend(rows(
        &name,
        &w,
        m[0],
        "qemu-storage-daemon qcow2",
        m[1],
        true,
    ));
    out.extend(rows(
        &format!("{name} vs raw"),
        &w,
        m[0],
        "keel raw (sparse)",
        m[2],
        false,
    ));
    Ok(out)
}

/// Rows on a RAM-backed disk (tmpfs, served through the page cache): the
/// backends' own CPU cost at QD64, two queues against one, CBT on and off.
fn ram_rows(size: u64, time: Duration, n: usize) -> Result<Vec<Measurement>, BenchError> {
    let dir = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in("/dev/shm")?;
    let image = dir.path().join("ram.raw");
    fill(&image, size)?;
    let ram = Serve {
        direct: false,
        ..DIRECT_RAW
    };
    let two = Serve { queues: 2, ..ram };
    let mut keel_side = start_keel(&image, &dir.path().join("k.sock"), two)?;
    let mut qsd_side = start_qsd(&image, &dir.path().join("q.sock"), ram)?;
    let mut cbt_side = start_keel(
        &image,
        &dir.path().join("c.sock"),
        Serve { cbt: true, ..ram },
    )?;
    let mut out = Vec::new();
    let qd64 = random4k("4 KiB random read QD64, RAM-backed", RequestKind::Read, 64);
    let m = compare(&mut [&mut keel_side, &mut qsd_side], qd64, time, n)?;
    out.extend(rows(
        qd64.name,
        &qd64,
        m[0],
        "qemu-storage-daemon (io_uring, page cache)",
        m[1],
        true,
    ));
    // QD1 on RAM: the latency the backend adds, without a device's spread.
    out.push(qd1_latency(
        "4 KiB random read QD1 latency, RAM-backed",
        &mut keel_side,
        &image,
        false,
        time,
        n,
    )?);
    let w = random4k(
        "4 KiB random read QD32 per queue, RAM-backed, 2 queues on 2 workers",
        RequestKind::Read,
        32,
    );
    let m = rounds(2, n, |i| keel_side.run(w, time, i + 1))?;
    out.extend(rows(w.name, &w, m[1], "keel, 1 queue", m[0], true));
    let w = random4k(
        "4 KiB random write QD32, RAM-backed, CBT on",
        RequestKind::Write,
        32,
    );
    let m = compare(&mut [&mut cbt_side, &mut keel_side], w, time, n)?;
    out.extend(rows(w.name, &w, m[0], "keel, CBT off", m[1], true));
    Ok(out)
}

/// QD1 latency (µs per request) of `side` against plain io_uring on the
/// same `image` (`direct`: O_DIRECT, else through the page cache), in
/// alternating rounds.
fn qd1_latency(
    name: &str,
    side: &mut Side,
    image: &Path,
    direct: bool,
    time: Duration,
    n: usize,
) -> Result<Measurement, BenchError> {
    let m = rounds(2, n, |i| {
        if i == 0 {
            side.run(RANDREAD_QD1, time, 1)
        } else {
            plain_uring_qd1(image, time, direct)
        }
    })?;
    let latency = |r: Rate| {
        if r.per_sec > 0.0 {
            1e6 / r.per_sec
        } else {
            0.0
        }
    };
    Ok(Measurement::new(name, "us", false, latency(m[0]))
        .with_peer("plain io_uring, same file", latency(m[1])))
}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    // Rounds per side and workload (even: each side goes first as often).
    let (size, time, n): (u64, Duration, usize) = match scale {
        Scale::Quick => (256 << 20, Duration::from_secs(1), 4),
        Scale::Full => (4 << 30, Duration::from_secs(5), 6),
    };
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from);
    let scratch = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in(base)?;
    let image = scratch.path().join("disk.raw");
    fill(&image, size)?;
    drop_cache(&image)?;
    let mut keel_side = start_keel(&image, &scratch.path().join("keel.sock"), DIRECT_RAW)?;
    let mut qsd_side = start_qsd(&image, &scratch.path().join("qsd.sock"), DIRECT_RAW)?;
    let mut results = Vec::new();
    let peer = "qemu-storage-daemon (aio=native)";
    for w in WORKLOADS {
        let m = compare(&mut [&mut keel_side, &mut qsd_side], *w, time, n)?;
        results.extend(rows(w.name, w, m[0], peer, m[1], w.depth == 32));
    }
    // QD1 latency against the floor: io_uring alone on the same file.
    results.push(qd1_latency(
        "4 KiB random read QD1 latency",
        &mut keel_side,
        &image,
        true,
        time,
        n,
    )?);
    // Anonymous memory is what each further disk costs; the rest of the
    // resident set is the binary's pages, shared by every disk server.
    for (name, field) in [
        (
            "Resident memory per attached disk (raw), private",
            "RssAnon",
        ),
        ("Resident memory per attached disk (raw), total", "VmRSS"),
    ] {
        let (k, q) = (
            memory_mib(keel_side.pid(), field),
            memory_mib(qsd_side.pid(), field),
        );
        results.push(Measurement::new(name, "MiB", false, k).with_peer(peer, q));
    }
    drop(qsd_side);
    results.extend(qcow2_rows(
        scratch.path(),
        &image,
        &mut keel_side,
        size,
        time,
        n,
    )?);
    drop(keel_side);
    results.extend(ram_rows(size.min(1 << 30), time, n)?);
    Ok(results)
}
