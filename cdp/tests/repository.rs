//! Backup repository, jobs, restore, retention and GC on real files (no
//! guest): see guest_backup.rs for the end-to-end test through vhost.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_cdp::backup::retention::plan;
use keel_cdp::backup::{
    backup, prune, restore, BackupIndex, BackupSpec, Digest, JobError, Kind, Policy, Progress,
    RepoError, Repository, RestoreError, RestoreMode, Tracking,
};
use keel_vhost::cbt::{Cbt, DEFAULT_BITMAP};
use keel_vhost::WriteHook;

const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 4 << 20; // 64 chunks
const CHUNK_US: usize = 64 << 10;

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Fixture {
    dir: tempfile::TempDir,
    repo: Repository,
    image: PathBuf,
}

/// Image: chunks 0..8 random, 8..16 a copy of 0..8 (dedup), 16..32 text
/// (compressible), the rest zero.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::create(&dir.path().join("repo")).unwrap();
    let image = dir.path().join("disk.raw");
    let mut data = vec![0u8; 64 * CHUNK_US];
    let rnd = pseudo_random(7, 8 * CHUNK_US);
    data[..rnd.len()].copy_from_slice(&rnd);
    data[rnd.len()..2 * rnd.len()].copy_from_slice(&rnd);
    let text = b"every point restores on its own; ".repeat(40000);
    data[16 * CHUNK_US..32 * CHUNK_US].copy_from_slice(&text[..16 * CHUNK_US]);
    std::fs::write(&image, data).unwrap();
    Fixture { dir, repo, image }
}

fn spec(f: &Fixture) -> BackupSpec {
    let mut s = BackupSpec::new("vm1-disk0", &f.image);
    s.chunk_size = CHUNK;
    s.threads = 2;
    s
}

fn none(_: Progress) {}

fn sha(path: &Path) -> Digest {
    Digest::of(&std::fs::read(path).unwrap())
}

/// Writes `data` into the image at `off` and tells the tracker, as the
/// vhost write path would (write-zeroes marks the same granules).
fn guest_write(f: &Fixture, cbt: &Cbt, off: u64, data: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.image)
        .unwrap();
    file.write_all_at(data, off).unwrap();
    cbt.on_write_zeroes(off, data.len() as u64);
}

#[test]
fn full_backup_dedups_compresses_skips_zeros_and_restores() {
    let f = fixture();
    let last = AtomicU64::new(0);
    let progress = |p: Progress| {
        assert!(p.done <= p.total);
        last.fetch_max(p.done, Ordering::Relaxed);
    };
    let r = backup(&f.repo, &spec(&f), Tracking::None, &progress).unwrap();
    assert_eq!(r.kind, Kind::Full);
    assert_eq!(r.chunks_total, 64);
    assert_eq!(r.chunks_read, 64);
    assert_eq!(r.chunks_zero, 32);
    // Two workers may both store a duplicate they race on; the store
    // keeps one file either way (checked by verify below).
    assert!(r.chunks_dedup > 0, "second copy of the random data: {r:?}");
    assert_eq!(r.chunks_stored + r.chunks_dedup + r.chunks_zero, 64);
    assert!(
        r.bytes_stored < 8 * CHUNK + 16 * CHUNK / 4,
        "text compressed: {}",
        r.bytes_stored
    );
    assert_eq!(
        last.load(Ordering::Relaxed),
        SIZE,
        "progress reached the total"
    );

    let out = f.dir.path().join("restored.raw");
    let rr = restore(&f.repo, &r.id, &out, RestoreMode::NewFile, 4, &none).unwrap();
    assert!(rr.verified);
    assert_eq!(rr.chunks_zero, 32);
    assert_eq!(sha(&out), sha(&f.image));
    assert!(
        std::fs::metadata(&out).unwrap().blocks() * 512 < SIZE,
        "zero chunks not written: sparse"
    );
    let v = f.repo.verify(&f.repo.points().unwrap()).unwrap();
    assert!(v.ok());
    assert_eq!(
        v.chunks_checked,
        8 + 16,
        "one stored chunk per distinct content"
    );
}

#[test]
fn incremental_reads_only_dirty_chunks_and_every_point_restores() {
    let f = fixture();
    let cbt = Cbt::new(SIZE, 4096).unwrap();
    cbt.add_bitmap("nightly").unwrap();
    let track = Tracking::Cbt {
        cbt: &cbt,
        bitmap: "nightly",
    };
    let full = backup(&f.repo, &spec(&f), track, &none).unwrap();
    assert_eq!(full.kind, Kind::Full);
    let sum0 = sha(&f.image);

    guest_write(&f, &cbt, 3 * CHUNK + 100, b"changed");
    guest_write(&f, &cbt, 40 * CHUNK, &pseudo_random(9, 8192)); // was zero
    guest_write(&f, &cbt, 42 * CHUNK - 10, &[7u8; 20]); // spans chunks 41 and 42
    let inc = backup(&f.repo, &spec(&f), track, &none).unwrap();
    assert_eq!(inc.kind, Kind::Incremental);
    assert_eq!(inc.chunks_read, 4, "chunks 3, 40, 41, 42");
    let sum1 = sha(&f.image);

    guest_write(&f, &cbt, 0, &[1u8; 512]);
    let inc2 = backup(&f.repo, &spec(&f), track, &none).unwrap();
    assert_eq!(inc2.chunks_read, 1);
    let sum2 = sha(&f.image);

    let idx = f.repo.load(&inc2.id).unwrap();
    assert_eq!(idx.parent.as_deref(), Some(inc.id.as_str()));
    assert_eq!(idx.cbt.as_ref().unwrap().generation, 2);

    for (id, want) in [(&full.id, sum0), (&inc.id, sum1), (&inc2.id, sum2)] {
        let out = f.dir.path().join(format!("{id}.raw"));
        restore(&f.repo, id, &out, RestoreMode::NewFile, 2, &none).unwrap();
        assert_eq!(sha(&out), want, "point {id} restores on its own");
    }

    // Restore in place: back to the full point over the changed disk.
    restore(&f.repo, &full.id, &f.image, RestoreMode::InPlace, 2, &none).unwrap();
    assert_eq!(sha(&f.image), sum0);
}

#[test]
fn invalid_bitmap_falls_back_to_full_and_failure_merges_bits_back() {
    let f = fixture();
    let path = f.dir.path().join("disk.cbt");
    {
        let cbt = Cbt::open(&path, SIZE, 4096).unwrap();
        let track = Tracking::Cbt {
            cbt: &cbt,
            bitmap: DEFAULT_BITMAP,
        };
        backup(&f.repo, &spec(&f), track, &none).unwrap();
        guest_write(&f, &cbt, 0, b"x");
        // dropped without persist_clean: a crash
    }
    let cbt = Cbt::open(&path, SIZE, 4096).unwrap();
    let track = Tracking::Cbt {
        cbt: &cbt,
        bitmap: DEFAULT_BITMAP,
    };
    let r = backup(&f.repo, &spec(&f), track, &none).unwrap();
    assert_eq!(r.kind, Kind::Full);
    assert_eq!(r.chunks_read, 64);
    assert!(r.fallback.as_deref().unwrap().contains("invalid"), "{r:?}");

    // A failing job puts the dirty bits back.
    guest_write(&f, &cbt, 5 * CHUNK, b"y");
    let mut bad = spec(&f);
    bad.source = f.dir.path().join("missing.raw");
    assert!(matches!(
        backup(&f.repo, &bad, track, &none),
        Err(JobError::OpenSource(..))
    ));
    let still = cbt.peek(DEFAULT_BITMAP).unwrap();
    assert!(still.valid);
    assert_eq!(still.dirty_granules(), vec![5 * CHUNK / 4096]);
    let r = backup(&f.repo, &spec(&f), track, &none).unwrap();
    assert_eq!((r.kind, r.chunks_read), (Kind::Incremental, 1));
}

#[test]
fn corrupt_chunk_is_reported_by_verify_and_refused_by_restore() {
    let f = fixture();
    let r = backup(&f.repo, &spec(&f), Tracking::None, &none).unwrap();
    let idx = f.repo.load(&r.id).unwrap();
    let d = idx.chunks[2].unwrap();
    let p = f.repo.chunk_path(&d);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();

    let v = f.repo.verify(std::slice::from_ref(&idx)).unwrap();
    assert!(!v.ok());
    // chunk 2's random data is also chunk 10 (dedup): both uses reported
    let offsets: Vec<u64> = v.bad.iter().map(|b| b.offset).collect();
    assert_eq!(offsets, vec![2 * CHUNK, 10 * CHUNK]);
    assert!(v.bad.iter().all(|b| b.point == r.id));

    let out = f.dir.path().join("bad.raw");
    let err = restore(&f.repo, &r.id, &out, RestoreMode::NewFile, 2, &none).unwrap_err();
    assert!(
        matches!(&err, RestoreError::BadChunk { offset, .. } if *offset == 2 * CHUNK || *offset == 10 * CHUNK),
        "{err:?}"
    );
    assert!(!out.exists(), "no half-restored file is left");

    // Truncated index: detected, and GC refuses to sweep.
    let ip = f.repo.root().join("points").join(format!("{}.idx", r.id));
    let b = std::fs::read(&ip).unwrap();
    std::fs::write(&ip, &b[..b.len() - 20]).unwrap();
    assert!(matches!(f.repo.load(&r.id), Err(RepoError::Index { .. })));
    assert!(f.repo.gc().is_err());
}

#[test]
fn second_job_on_a_disk_is_refused() {
    let f = fixture();
    let _held = f.repo.lock_disk("vm1-disk0").unwrap();
    assert!(matches!(
        backup(&f.repo, &spec(&f), Tracking::None, &none),
        Err(JobError::Repo(RepoError::Busy(_)))
    ));
}

#[test]
fn prune_then_gc_frees_only_unreferenced_chunks() {
    let f = fixture();
    let first = backup(&f.repo, &spec(&f), Tracking::None, &none).unwrap();
    // New random data over chunks 0..16: the first point's 8 random chunks
    // become garbage once it is pruned.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.image)
        .unwrap();
    file.write_all_at(&pseudo_random(11, 16 * CHUNK_US), 0)
        .unwrap();
    let second = backup(&f.repo, &spec(&f), Tracking::None, &none).unwrap();
    // A crashed job's leftover: a chunk no index names.
    let orphan = Digest::of(b"orphan");
    f.repo.put_chunk(&orphan, b"junk").unwrap();

    let g = f.repo.gc().unwrap();
    assert_eq!(g.removed_chunks, 1, "only the orphan");
    assert!(!f.repo.has_chunk(&orphan));

    let policy = Policy {
        max_count: Some(1),
        max_age: None,
    };
    let p = prune(&f.repo, policy, u64::MAX).unwrap();
    assert_eq!(p.remove, vec![first.id.clone()]);
    let g = f.repo.gc().unwrap();
    assert_eq!(g.removed_chunks, 8, "the first point's random chunks");
    let out = f.dir.path().join("second.raw");
    restore(&f.repo, &second.id, &out, RestoreMode::NewFile, 2, &none).unwrap();
    assert_eq!(sha(&out), sha(&f.image));
    assert!(f.repo.verify(&f.repo.points().unwrap()).unwrap().ok());
}

fn point(id: &str, disk: &str, created_ms: u64, kind: Kind, parent: Option<&str>) -> BackupIndex {
    BackupIndex {
        id: id.into(),
        disk: disk.into(),
        disk_size: 1,
        chunk_size: 1,
        created_ms,
        kind,
        parent: parent.map(Into::into),
        cbt: None,
        fallback: None,
        chunks: vec![None],
        encryption: None,
    }
}

#[test]
fn retention_count_age_newest_and_full_kept_rules() {
    let day = 86_400_000;
    let pts = vec![
        point("f1", "a", day, Kind::Full, None),
        point("i1", "a", 2 * day, Kind::Incremental, Some("f1")),
        point("i2", "a", 3 * day, Kind::Incremental, Some("i1")),
        point("i3", "a", 4 * day, Kind::Incremental, Some("i2")),
        point("f2", "a", 5 * day, Kind::Full, None),
        point("b1", "b", day, Kind::Full, None),
    ];
    // count 2: f2 and i3 kept; i3's chain base f1 is kept too.
    let count = Policy {
        max_count: Some(2),
        max_age: None,
    };
    let p = plan(&pts, count, 6 * day);
    assert_eq!(p.keep, vec!["f1", "i3", "f2", "b1"]);
    assert_eq!(p.remove, vec!["i1", "i2"]);
    // age 1.5 days: only f2 is young; b1 is old but the newest of its disk.
    let age = Policy {
        max_count: None,
        max_age: Some(Duration::from_millis(day * 3 / 2)),
    };
    let p = plan(&pts, age, 6 * day);
    assert_eq!(p.keep, vec!["f2", "b1"]);
    // no limits: everything stays
    assert!(plan(&pts, Policy::default(), 6 * day).remove.is_empty());
}

#[test]
fn encrypted_chain_names_chunks_by_key_and_a_key_change_takes_a_full() {
    use keel_cdp::backup::ChunkKey;
    let f = fixture();
    let key = ChunkKey::from_hex(&"5a".repeat(32)).unwrap();
    let fingerprint = key.fingerprint().to_owned();
    let sealed = f.repo.clone().with_key(key);
    let cbt = Cbt::new(SIZE, 4096).unwrap();
    cbt.add_bitmap("nightly").unwrap();
    let track = Tracking::Cbt {
        cbt: &cbt,
        bitmap: "nightly",
    };
    let full = backup(&sealed, &spec(&f), track, &none).unwrap();
    assert_eq!(full.encryption.as_deref(), Some(fingerprint.as_str()));
    let idx = f.repo.load(&full.id).unwrap();
    assert_eq!(idx.encryption.as_deref(), Some(fingerprint.as_str()));
    let first = idx.chunks[0].unwrap();
    assert_ne!(
        first,
        Digest::of(&std::fs::read(&f.image).unwrap()[..CHUNK_US]),
        "named by the keyed digest, not the content hash"
    );
    guest_write(&f, &cbt, 3 * CHUNK, b"changed");
    let inc = backup(&sealed, &spec(&f), track, &none).unwrap();
    assert_eq!(inc.kind, Kind::Incremental);
    assert_eq!(inc.chunks_read, 1);

    // Without the key: the chain's parent cannot be inherited from.
    guest_write(&f, &cbt, 5 * CHUNK, b"again");
    let plain = backup(&f.repo, &spec(&f), track, &none).unwrap();
    assert_eq!(plain.kind, Kind::Full);
    assert!(
        plain
            .fallback
            .as_deref()
            .unwrap()
            .contains("encryption key"),
        "{plain:?}"
    );
    assert!(plain.encryption.is_none());

    let out = f.dir.path().join("inc.raw");
    assert!(matches!(
        restore(&f.repo, &inc.id, &out, RestoreMode::NewFile, 2, &none),
        Err(RestoreError::Repo(RepoError::Key { .. }))
    ));
    assert!(!out.exists());
    restore(&sealed, &inc.id, &out, RestoreMode::NewFile, 2, &none).unwrap();
    let v = sealed.verify(&[f.repo.load(&inc.id).unwrap()]).unwrap();
    assert!(v.ok());
    assert!(matches!(
        f.repo.verify(&[f.repo.load(&inc.id).unwrap()]),
        Err(RepoError::Key { .. })
    ));
}

/// The point-in-time path: a bitmap frozen elsewhere (the disk server),
/// the planned chunks staged to a sparse copy, the job run on the copy.
/// A failed or abandoned job gives the frozen bits back.
#[test]
fn staged_jobs_on_a_frozen_bitmap_equal_direct_ones_and_give_bits_back_on_failure() {
    use keel_cdp::backup::staging::copy_chunks_sparse;
    use keel_cdp::backup::{BackupJob, FrozenCbt};
    let f = fixture();
    let cbt = Cbt::new(SIZE, 4096).unwrap();
    cbt.add_bitmap("chain").unwrap();
    let merged = std::sync::Mutex::new(Vec::new());
    let (cbt, merged) = (&cbt, &merged);
    let frozen = move || FrozenCbt {
        bitmap: cbt.freeze_and_reset("chain").unwrap(),
        merge_back: Box::new(move |b| {
            merged.lock().unwrap().push(b.dirty_granules());
            cbt.merge_back(b).map_err(|e| e.to_string())
        }),
    };
    let staged = f.dir.path().join("staged.raw");
    let stage_and_run = |frozen: Option<FrozenCbt<'_>>| {
        let mut spec = spec(&f);
        spec.scratch_source = true;
        let mut job = BackupJob::lock(&f.repo, &spec).unwrap();
        let chunks = job.plan(SIZE, frozen).unwrap().to_vec();
        copy_chunks_sparse(&f.image, &staged, job.chunk_size(), &chunks).unwrap();
        let r = job.run(&staged, &none).unwrap();
        // A scratch source is freed as it is read.
        assert_eq!(std::fs::metadata(&staged).unwrap().blocks(), 0);
        std::fs::remove_file(&staged).unwrap();
        r
    };

    // Full (no parent in the chain yet), from a staged copy.
    let full = stage_and_run(Some(frozen()));
    assert_eq!((full.kind, full.chunks_read), (Kind::Full, 64));
    let out = f.dir.path().join("r1.raw");
    restore(&f.repo, &full.id, &out, RestoreMode::NewFile, 2, &none).unwrap();
    assert_eq!(sha(&out), sha(&f.image));

    // Incremental: only the dirty chunk is staged (the rest of the staging
    // file is a hole the job never reads).
    guest_write(&f, cbt, 40 * CHUNK + 5, b"changed");
    let inc = stage_and_run(Some(frozen()));
    assert_eq!((inc.kind, inc.chunks_read), (Kind::Incremental, 1));
    let out = f.dir.path().join("r2.raw");
    restore(&f.repo, &inc.id, &out, RestoreMode::NewFile, 2, &none).unwrap();
    assert_eq!(sha(&out), sha(&f.image));
    assert!(merged.lock().unwrap().is_empty());

    // A job whose source is gone fails and merges its bits back; so does
    // one dropped after planning (the staging copy failed).
    guest_write(&f, cbt, 50 * CHUNK, b"again");
    let mut job = BackupJob::lock(&f.repo, &spec(&f)).unwrap();
    job.plan(SIZE, Some(frozen())).unwrap();
    assert!(matches!(
        job.run(&f.dir.path().join("missing.raw"), &none),
        Err(JobError::OpenSource(..))
    ));
    let mut job = BackupJob::lock(&f.repo, &spec(&f)).unwrap();
    job.plan(SIZE, Some(frozen())).unwrap();
    drop(job);
    let g = 50 * CHUNK / 4096;
    assert_eq!(*merged.lock().unwrap(), vec![vec![g], vec![g]]);
    assert_eq!(cbt.peek("chain").unwrap().dirty_granules(), vec![g]);
    // A bitmap of another granularity than the chunk size allows is refused
    // at plan, and its bits go back too.
    let mut job = BackupJob::lock(&f.repo, &spec(&f)).unwrap();
    let mut odd = frozen();
    odd.bitmap.granularity = 3 * CHUNK;
    assert!(matches!(
        job.plan(SIZE, Some(odd)),
        Err(JobError::ChunkSize(_))
    ));
    drop(job);
    assert_eq!(merged.lock().unwrap().len(), 3);
}
