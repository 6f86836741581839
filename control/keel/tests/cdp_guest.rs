//! CDP with a real guest: `keel cdp source` serves a QEMU guest's disk in a
//! "primary site" namespace and ships its journal over mutual TLS, across a
//! veth, to `keel cdp replica` in a "DR site" namespace (198.18.7.0/24).
//! (This machine's kernel has no `sch_netem`, so the link has no added
//! delay or loss.) The guest writes numbered blocks, each
//! flushed, in order.
//!
//! Checked: once shipped, the replica equals the source; after `kill -9`
//! of the source in the middle of a write stream, the replica holds a
//! prefix of that stream (blocks 0..k written, nothing after: never a torn
//! or reordered state); the restarted source recovers (resync) and the
//! replica converges to the source exactly, resending only the chunks that
//! differ (delta resync); promote leaves a plain disk image equal to the
//! source; reprotect (the DR disk as source, the old primary's image
//! adopted as replica disk) sends only the chunks written at the DR site.
//!
//! The guest is stopped before the source restarts: without vhost-user
//! inflight tracking (not built yet) requests in flight at the kill are not
//! resubmitted, so the guest's I/O would not carry on.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_testkit::{keel_bin, veth_pair, Guest, GuestConfig, NetnsHost};
use serde_json::Value;

const DISK: u64 = 64 << 20;
const BLOCK: usize = 4096;
const FIRST: usize = 200;
const STREAM: usize = 1200;

struct Sites {
    src: NetnsHost,
    dr: NetnsHost,
    work: PathBuf,
    certs: Value,
    /// Extra `keel cdp source` arguments.
    source_args: Vec<String>,
}

impl Sites {
    /// Two namespaces (`<tag>s`, `<tag>r`) joined by a veth, a blank
    /// source image and the group's certificates, under `work`.
    fn new(tag: &str, work: &Path) -> Self {
        std::fs::File::create(work.join("source.raw"))
            .unwrap()
            .set_len(DISK)
            .unwrap();
        let out = std::process::Command::new(keel_bin())
            .args(["cdp", "certs", "--out"])
            .arg(work.join("pki"))
            .args(["--replica-name", "keel-replica"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let certs: Value = serde_json::from_slice(&out.stdout).unwrap();
        let src = NetnsHost::new(&format!("{tag}s")).unwrap();
        let dr = NetnsHost::new(&format!("{tag}r")).unwrap();
        veth_pair(&src, "eth0", &dr, "eth0").unwrap();
        src.add_addr("eth0", "198.18.7.1/24").unwrap();
        dr.add_addr("eth0", "198.18.7.2/24").unwrap();
        Sites {
            src,
            dr,
            work: work.to_owned(),
            certs,
            source_args: Vec::new(),
        }
    }

    /// A guest with the source's disk as /dev/vda.
    fn boot_guest(&self, name: &str) -> Guest {
        let chardev = format!("socket,id=vub,path={},reconnect=1", self.socket().display());
        Guest::boot(GuestConfig::new(name).qemu_args([
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-blk-pci,chardev=vub",
        ]))
        .unwrap()
    }

    fn keel(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec![keel_bin().display().to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// Starts a keel command in `host`, its output in `log`; returns its pid.
    fn spawn(&self, host: &NetnsHost, args: Vec<String>, log: &str) -> u32 {
        let cmd = args
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let script = format!("exec {cmd} >> {} 2>&1", self.work.join(log).display());
        host.spawn(&["sh", "-c", &script]).unwrap()
    }

    fn tls(&self, side: &str) -> Vec<String> {
        let c = &self.certs;
        vec![
            "--cert".into(),
            c[side]["cert"].as_str().unwrap().into(),
            "--key".into(),
            c[side]["key"].as_str().unwrap().into(),
            "--ca".into(),
            c["ca"].as_str().unwrap().into(),
        ]
    }

    fn start_replica(&self) -> u32 {
        self.replica_at(&self.dr, "198.18.7.2:7700", "replica", "1")
    }

    /// A replica in `host` listening on `listen`, directory `dir` of the
    /// work directory, for source site `site`.
    fn replica_at(&self, host: &NetnsHost, listen: &str, dir: &str, site: &str) -> u32 {
        let mut args = self.keel(&[
            "cdp",
            "replica",
            "--listen",
            listen,
            "--dir",
            self.work.join(dir).to_str().unwrap(),
            "--group",
            "1",
            "--source-site",
            site,
        ]);
        args.extend(self.tls("replica"));
        self.spawn(host, args, &format!("{dir}.log"))
    }

    fn start_source(&self) -> u32 {
        self.source_at(
            &self.src,
            &self.socket(),
            &self.image(),
            "journal",
            "1",
            "198.18.7.2:7700",
        )
    }

    /// A source in `host` serving `image` on `socket`, journal `journal` of
    /// the work directory, as site `site`, shipping to `replica`.
    fn source_at(
        &self,
        host: &NetnsHost,
        socket: &Path,
        image: &Path,
        journal: &str,
        site: &str,
        replica: &str,
    ) -> u32 {
        let disk = format!("{}={}", socket.display(), image.display());
        let mut args = self.keel(&[
            "cdp",
            "source",
            "--disk",
            &disk,
            "--journal",
            self.work.join(journal).to_str().unwrap(),
            "--group",
            "1",
            "--site",
            site,
            "--rpo-secs",
            "1",
            "--replica",
            replica,
            "--server-name",
            "keel-replica",
            "--zstd",
            "1",
        ]);
        args.extend(self.tls("source"));
        args.extend(self.source_args.iter().cloned());
        let pid = self.spawn(host, args, &format!("{journal}.log"));
        wait("the source's socket", || socket.exists());
        pid
    }

    fn socket(&self) -> PathBuf {
        self.work.join("disk.sock")
    }

    fn image(&self) -> PathBuf {
        self.work.join("source.raw")
    }

    fn replica_disk(&self) -> PathBuf {
        self.work.join("replica").join("disk-0.raw")
    }

    fn status(&self) -> Value {
        self.status_of("journal")
    }

    /// The status file of the source whose journal is `journal`.
    fn status_of(&self, journal: &str) -> Value {
        std::fs::read(self.work.join(journal).join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// Waits until everything journaled so far is acknowledged by the replica.
    fn wait_shipped(&self) {
        self.wait_shipped_of("journal");
    }

    /// [`Sites::wait_shipped`] for the source whose journal is `journal`.
    fn wait_shipped_of(&self, journal: &str) {
        // One RPO period seals what the guest wrote.
        std::thread::sleep(Duration::from_millis(1500));
        let sealed = self.status_of(journal)["last_sealed_seq"]
            .as_u64()
            .unwrap_or(0);
        wait("the replica to acknowledge every sealed segment", || {
            let s = self.status_of(journal);
            s["mode"] == "journal"
                && s["resyncing"] == false
                && s["dirty_chunks"] == 0
                && s["last_acked_seq"].as_u64().unwrap_or(0) >= sealed
        });
    }
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid this test spawned; at worst it names none.
    unsafe {
        libc::kill(i32::try_from(pid).unwrap(), signal);
    }
}

fn wait_gone(pid: u32) {
    wait("the process to exit", || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
}

fn block(path: &Path, i: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 16];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, (i * BLOCK) as u64)
        .unwrap();
    buf
}

fn pattern(i: usize) -> Vec<u8> {
    let mut p = format!("BLOCK-{i:06}").into_bytes();
    p.resize(16, 0);
    p
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// The guest's loop: block i gets "BLOCK-i", flushed before the next.
fn writes(from: usize, to: usize) -> String {
    format!(
        "i={from}; while [ $i -lt {to} ]; do printf 'BLOCK-%06d' $i | dd of=/dev/vda bs=4096 seek=$i conv=notrunc,fsync 2>/dev/null; i=$((i+1)); done"
    )
}

#[test]
fn guest_writes_reach_the_dr_site_as_a_flush_ordered_prefix_across_a_source_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().to_owned();
    let sites = Sites::new("cdp", &work);
    let replica = sites.start_replica();
    let source = sites.start_source();
    let mut guest = sites.boot_guest("cdp");

    // Written and shipped: the replica equals the source.
    guest.run(&writes(0, FIRST)).unwrap();
    sites.wait_shipped();
    kill(replica, libc::SIGTERM);
    wait_gone(replica);
    assert!(
        same(&sites.image(), &sites.replica_disk()),
        "replica equals the source"
    );
    let replica = sites.start_replica();

    // kill -9 of the source in the middle of a stream of flushed writes.
    // Its own session, so it outlives the console command that starts it.
    let script = writes(FIRST, STREAM).replace('\'', "\"");
    guest
        .run(&format!(
            "echo '{script}' > /tmp/stream.sh; setsid sh /tmp/stream.sh > /dev/null 2>&1 < /dev/null &"
        ))
        .unwrap();
    wait("the stream to be under way", || {
        block(&sites.image(), FIRST + 20) == pattern(FIRST + 20)
    });
    // Two RPO periods of streaming, so some of it is shipped and some not.
    std::thread::sleep(Duration::from_secs(2));
    kill(source, libc::SIGKILL);
    wait_gone(source);
    std::thread::sleep(Duration::from_secs(2));
    kill(replica, libc::SIGTERM);
    wait_gone(replica);
    let replica_disk = sites.replica_disk();
    let k = (FIRST..STREAM)
        .find(|&i| block(&replica_disk, i) != pattern(i))
        .unwrap_or(STREAM);
    eprintln!(
        "replica after kill -9: a prefix of {} of the {} stream blocks",
        k - FIRST,
        STREAM - FIRST
    );
    for i in 0..FIRST {
        assert_eq!(
            block(&replica_disk, i),
            pattern(i),
            "block {i} shipped earlier"
        );
    }
    for i in k..STREAM {
        assert_eq!(
            block(&replica_disk, i),
            vec![0u8; 16],
            "block {i}: the replica must hold a prefix (first gap at {k})"
        );
    }

    // The source restarts (recovery, resync) and the replica converges to
    // the source.
    drop(guest);
    let replica = sites.start_replica();
    let source = sites.start_source();
    sites.wait_shipped();
    // Delta resync: every chunk compared with the replica, only the ones
    // the crash left different resent (at most the stream's chunks).
    let status = sites.status();
    let chunks = DISK / (64 << 10);
    assert_eq!(status["digest_compared"].as_u64(), Some(chunks), "{status}");
    let resent = status["resync_chunks"].as_u64().unwrap();
    let stream_chunks = (STREAM * BLOCK) as u64 / (64 << 10) + 1;
    assert!(
        resent <= stream_chunks && resent < chunks / 10,
        "the restart resent {resent} of {chunks} chunks: {status}"
    );
    eprintln!("restart after kill -9: {resent} of {chunks} chunks resent");
    kill(source, libc::SIGTERM);
    wait_gone(source);
    kill(replica, libc::SIGTERM);
    wait_gone(replica);
    for i in 0..k {
        assert_eq!(block(&sites.image(), i), pattern(i), "source block {i}");
    }
    assert!(
        same(&sites.image(), &replica_disk),
        "replica converged to the source"
    );

    // Promote: the replica's disk is a plain image at its latest point.
    let out = std::process::Command::new(keel_bin())
        .args(["cdp", "promote", "--dir"])
        .arg(work.join("replica"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        same(&sites.image(), &replica_disk),
        "promoted disk equals the source"
    );

    // Reprotect: the promoted DR disk (written on at the DR site
    // meanwhile) becomes the source, the old primary's image the disk of a
    // new replica directory; only the chunks that differ travel.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&replica_disk)
            .unwrap();
        f.write_all_at(&pattern(9_003), 3 * BLOCK as u64).unwrap();
        for i in 2000..2010 {
            f.write_all_at(&pattern(9_000 + i), (i * BLOCK) as u64)
                .unwrap();
        }
    }
    let back = work.join("reverse");
    std::fs::create_dir_all(&back).unwrap();
    std::fs::rename(sites.image(), back.join("disk-0.raw")).unwrap();
    let replica = sites.replica_at(&sites.src, "198.18.7.1:7701", "reverse", "2");
    let source = sites.source_at(
        &sites.dr,
        &work.join("dr.sock"),
        &replica_disk,
        "journal-reverse",
        "2",
        "198.18.7.1:7701",
    );
    sites.wait_shipped_of("journal-reverse");
    let status = sites.status_of("journal-reverse");
    kill(source, libc::SIGTERM);
    wait_gone(source);
    kill(replica, libc::SIGTERM);
    wait_gone(replica);
    assert_eq!(status["digest_compared"].as_u64(), Some(chunks), "{status}");
    assert_eq!(
        status["resync_chunks"].as_u64(),
        Some(2),
        "only chunks 0 and 125 differ: {status}"
    );
    assert_eq!(status["digest_equal"].as_u64(), Some(chunks - 2));
    assert!(
        same(&replica_disk, &back.join("disk-0.raw")),
        "the old primary's disk equals the DR disk again"
    );
}

/// Synchronous mode (RPO 0) with a real guest: its direct (uncached)
/// writes complete only once the DR site has them, so after `kill -9` of
/// the source every write the guest saw complete is on the replica.
#[test]
fn sync_mode_loses_no_acknowledged_write_when_the_source_dies() {
    const N: usize = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().to_owned();
    let mut sites = Sites::new("cdq", &work);
    sites.source_args = vec!["--sync-timeout-secs".into(), "60".into()];
    let replica = sites.start_replica();
    let source = sites.start_source();
    let mut guest = sites.boot_guest("cdpsync");
    wait("synchronous replication to engage", || {
        sites.status()["replication"] == "sync"
    });

    // Each block written with O_DIRECT (the completion is the virtio
    // write's own, no flush); the guest notes it only once dd returned.
    let script = format!(
        "i=0; while [ $i -lt {N} ]; do printf 'BLOCK-%06d' $i | dd of=/dev/vda bs=4096 seek=$i oflag=direct conv=notrunc 2>/dev/null && echo $i > /tmp/acked; i=$((i+1)); done"
    );
    guest
        .run(&format!(
            "echo '{}' > /tmp/stream.sh; setsid sh /tmp/stream.sh > /dev/null 2>&1 < /dev/null &",
            script.replace('\'', "\"")
        ))
        .unwrap();
    wait("the stream to be under way", || {
        block(&sites.image(), 30) == pattern(30)
    });
    std::thread::sleep(Duration::from_secs(1));
    kill(source, libc::SIGKILL);
    wait_gone(source);
    let out = guest.run("cat /tmp/acked").unwrap();
    // The console may interleave kernel messages about the lost device.
    let acked: usize = out
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no acknowledged index in {out:?}"));
    std::thread::sleep(Duration::from_secs(1));
    kill(replica, libc::SIGTERM);
    wait_gone(replica);
    let replica_disk = sites.replica_disk();
    let held = (0..N)
        .find(|&i| block(&replica_disk, i) != pattern(i))
        .unwrap_or(N);
    eprintln!(
        "sync: guest saw {} writes complete, the replica holds {held}",
        acked + 1
    );
    assert!(acked >= 30);
    for i in 0..=acked {
        assert_eq!(
            block(&replica_disk, i),
            pattern(i),
            "block {i} completed to the guest before the crash"
        );
    }
    drop(guest);
}
