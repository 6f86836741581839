//! `backup`: keel's CBT backup engine (keel-cdp) against the tools a user
//! would otherwise run on the same image, in the same process, same files:
//!
//! - full backup vs `zstd -1 -T0` of the image (a compressed copy: the
//!   cheapest comparable backup) and vs `cp --sparse=always`; every peer
//!   output is `sync`ed, as keel fsyncs its chunks;
//! - full backup vs `restic backup` (a dedup chunk store like PBS) when
//!   restic is installed;
//! - incremental with 1 % of the chunks dirty, as a fraction of a full;
//! - restore vs `zstd -d` of the peer's copy;
//! - dedup ratio on a disk holding the same data twice vs zstd -1's ratio;
//! - SHA-256 and zstd-1 single-thread speed (why SHA-256, not BLAKE3).
//!
//! The image: 1/4 random, 1/4 compressible text, 1/2 zero, in the scratch
//! directory (`KEEL_BENCH_DIR` or the current directory). Reads come from
//! the page cache for keel and peers alike.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use keel_cdp::backup::{
    backup, restore, BackupSpec, ChunkKey, Digest, Progress, Repository, RestoreMode, Tracking,
};
use keel_vhost::cbt::Cbt;
use keel_vhost::WriteHook;

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "backup",
    about: "CBT backup/restore vs zstd, cp --sparse, restic",
    run,
};

const GRANULE: u64 = 64 << 10;

fn err(e: impl std::error::Error + Send + Sync + 'static) -> BenchError {
    BenchError::Io(std::io::Error::other(e))
}

fn none(_: Progress) {}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    let size: u64 = match scale {
        Scale::Quick => 64 << 20,
        Scale::Full => 1 << 30,
    };
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from);
    let scratch = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in(base)?;
    let dir = scratch.path();
    let image = dir.join("disk.raw");
    write_image(&image, size)?;
    let mb = size as f64 / 1e6;
    let mut out = Vec::new();

    // Full backup vs compressed copy.
    let repo = Repository::create(&dir.join("repo")).map_err(err)?;
    let spec = BackupSpec::new("bench", &image);
    let t = Instant::now();
    let full = backup(&repo, &spec, Tracking::None, &none).map_err(err)?;
    let keel_full = t.elapsed().as_secs_f64();
    let zst = dir.join("peer.zst");
    let peer_zstd = timed_sh(&format!(
        "zstd -q -1 -T0 -f {} -o {} && sync {}",
        image.display(),
        zst.display(),
        zst.display()
    ))?;
    out.push(
        Measurement::new(
            "full backup (4 MiB chunks, SHA-256, zstd-1)",
            "MB/s",
            true,
            mb / keel_full,
        )
        .with_peer("zstd -1 -T0 + sync", mb / peer_zstd),
    );
    let copy = dir.join("peer.raw");
    let peer_cp = timed_sh(&format!(
        "cp --sparse=always {} {} && sync {}",
        image.display(),
        copy.display(),
        copy.display()
    ))?;
    out.push(
        Measurement::new("full backup", "MB/s", true, mb / keel_full)
            .with_peer("cp --sparse=always + sync", mb / peer_cp),
    );
    // The same with a VDC key: AES-256-GCM per chunk, HMAC chunk names.
    let key = ChunkKey::from_hex(&ChunkKey::generate_hex().map_err(err)?).map_err(err)?;
    let sealed = Repository::create(&dir.join("repo-sealed"))
        .map_err(err)?
        .with_key(key);
    let t = Instant::now();
    backup(&sealed, &spec, Tracking::None, &none).map_err(err)?;
    let keel_sealed = t.elapsed().as_secs_f64();
    out.push(
        Measurement::new(
            "full backup, encrypted (AES-256-GCM, HMAC-SHA256 names)",
            "MB/s",
            true,
            mb / keel_sealed,
        )
        .with_peer("the same, unencrypted", mb / keel_full),
    );
    if let Some(restic) = restic_backup(dir, &image)? {
        out.push(
            Measurement::new("full backup", "MB/s", true, mb / keel_full)
                .with_peer("restic backup (fresh repo)", mb / restic),
        );
    }

    // Incremental with 1 % of the chunks dirty (one granule written in
    // each), in a fresh repository so its full pays the same stores.
    let repo3 = Repository::create(&dir.join("repo3")).map_err(err)?;
    let cbt = Cbt::new(size, GRANULE).map_err(err)?;
    cbt.add_bitmap("b").map_err(err)?;
    let track = Tracking::Cbt {
        cbt: &cbt,
        bitmap: "b",
    };
    let t = Instant::now();
    backup(&repo3, &spec, track, &none).map_err(err)?;
    let full_cbt = t.elapsed().as_secs_f64();
    let nchunks = size / spec.chunk_size;
    let file = std::fs::OpenOptions::new().write(true).open(&image)?;
    for i in 0..(nchunks / 100).max(1) {
        let off = (i * 100 + 37) % nchunks * spec.chunk_size + GRANULE;
        std::os::unix::fs::FileExt::write_all_at(&file, &(i + 1).to_le_bytes(), off)?;
        cbt.on_write_zeroes(off, 8);
    }
    let t = Instant::now();
    let inc = backup(&repo3, &spec, track, &none).map_err(err)?;
    let keel_inc = t.elapsed().as_secs_f64();
    out.push(Measurement::new(
        &format!(
            "incremental, 1 % of chunks dirty ({} of {} read), time vs full",
            inc.chunks_read, inc.chunks_total
        ),
        "%",
        false,
        100.0 * keel_inc / full_cbt,
    ));

    // Restore vs decompressing the peer copy.
    let restored = dir.join("restored.raw");
    let t = Instant::now();
    restore(&repo, &full.id, &restored, RestoreMode::NewFile, 8, &none).map_err(err)?;
    let keel_restore = t.elapsed().as_secs_f64();
    let unz = dir.join("peer-restored.raw");
    let peer_unz = timed_sh(&format!(
        "zstd -q -d -f --sparse {} -o {} && sync {}",
        zst.display(),
        unz.display(),
        unz.display()
    ))?;
    out.push(
        Measurement::new(
            "restore incl. verify (8 in flight)",
            "MB/s",
            true,
            mb / keel_restore,
        )
        .with_peer("zstd -d --sparse + sync (no verify)", mb / peer_unz),
    );

    // Dedup: a disk with the same random data twice.
    let twice = dir.join("twice.raw");
    let half = usize::try_from(size / 8).unwrap_or(usize::MAX);
    let rnd = random_bytes(7, half);
    std::fs::write(&twice, [rnd.as_slice(), rnd.as_slice()].concat())?;
    let repo2 = Repository::create(&dir.join("repo2")).map_err(err)?;
    let r = backup(
        &repo2,
        &BackupSpec::new("twice", &twice),
        Tracking::None,
        &none,
    )
    .map_err(err)?;
    let logical = (2 * half) as f64;
    let z2 = dir.join("twice.zst");
    timed_sh(&format!(
        "zstd -q -1 -f {} -o {}",
        twice.display(),
        z2.display()
    ))?;
    let z2_len = std::fs::metadata(&z2)?.len() as f64;
    out.push(
        Measurement::new(
            "dedup ratio, disk holding the same data twice",
            "x",
            true,
            logical / r.bytes_stored.max(1) as f64,
        )
        .with_peer("zstd -1", logical / z2_len.max(1.0)),
    );

    // Per-core primitives.
    let sample = random_bytes(3, 64 << 20);
    let t = Instant::now();
    let d = Digest::of(&sample);
    let sha = 64.0 * 1.048_576 / t.elapsed().as_secs_f64();
    std::hint::black_box(d);
    let text = compressible_bytes(64 << 20);
    let t = Instant::now();
    let z = zstd::bulk::compress(&text, 1)?;
    let zs = 64.0 * 1.048_576 / t.elapsed().as_secs_f64();
    std::hint::black_box(z);
    out.push(
        Measurement::new("SHA-256 one core (sha2, SHA-NI)", "MB/s", true, sha)
            .with_peer("zstd-1 compress one core", zs),
    );
    Ok(out)
}

fn timed_sh(script: &str) -> Result<f64, BenchError> {
    let t = Instant::now();
    let status = Command::new("sh").arg("-c").arg(script).status()?;
    if !status.success() {
        return Err(BenchError::Io(std::io::Error::other(format!(
            "peer failed: {script}"
        ))));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds for `restic backup` of the image into a fresh repository, or
/// `None` when restic is not installed.
fn restic_backup(dir: &Path, image: &Path) -> Result<Option<f64>, BenchError> {
    if Command::new("restic").arg("version").output().is_err() {
        return Ok(None);
    }
    let repo = dir.join("restic");
    let env = format!("RESTIC_PASSWORD=bench RESTIC_REPOSITORY={}", repo.display());
    timed_sh(&format!("{env} restic init -q"))?;
    let secs = timed_sh(&format!(
        "{env} restic backup -q {} && sync -f {}",
        image.display(),
        repo.display()
    ))?;
    Ok(Some(secs))
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn compressible_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("line {i}: the quick brown fox, keel backup\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// 1/4 random, 1/4 text, 1/2 zero (sparse).
fn write_image(path: &Path, size: u64) -> Result<(), BenchError> {
    let q = usize::try_from(size / 4).unwrap_or(usize::MAX);
    let mut data = random_bytes(1, q);
    data.extend_from_slice(&compressible_bytes(q));
    std::fs::write(path, &data)?;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(size)?;
    f.sync_all()?;
    Ok(())
}
