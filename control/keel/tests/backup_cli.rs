//! `keel backup` through the real binary: create (full, then again with
//! dedup), list, restore + compare, verify (clean, then a corrupted chunk
//! fails), prune, gc.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

use keel_testkit::keel_bin;

fn keel(repo: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(keel_bin())
        .arg("backup")
        .arg("--repo")
        .arg(repo)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), stdout)
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn backup_cli_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = dir.path().join("disk.raw");
    let mut data = vec![0u8; 16 << 20];
    for (i, b) in data[..4 << 20].iter_mut().enumerate() {
        *b = u8::try_from(i * 31 % 251).unwrap();
    }
    std::fs::write(&img, &data).unwrap();
    let img_s = img.to_str().unwrap();

    let create = [
        "create",
        "--disk",
        "d0",
        "--image",
        img_s,
        "--chunk-size",
        "1048576",
    ];
    let (ok, out) = keel(&repo, &create);
    assert!(ok, "{out}");
    let first = &json_lines(&out)[0];
    assert_eq!(first["kind"], "full");
    assert_eq!(first["chunks_zero"], 12);
    let (ok, out) = keel(&repo, &create);
    assert!(ok);
    assert_eq!(json_lines(&out)[0]["chunks_stored"], 0, "all deduplicated");

    let (ok, out) = keel(&repo, &["list"]);
    assert!(ok);
    let points = json_lines(&out);
    assert_eq!(points.len(), 2);
    let id = points[0]["id"].as_str().unwrap().to_owned();

    let to = dir.path().join("restored.raw");
    let (ok, out) = keel(&repo, &["restore", &id, "--to", to.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&to).unwrap(), data);

    let (ok, out) = keel(&repo, &["verify"]);
    assert!(ok, "{out}");
    // Corrupt one chunk file: verify fails and names it.
    let shard = std::fs::read_dir(repo.join("chunks"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let (ok, out) = keel(&repo, &["verify", &id]);
    assert!(!ok, "verify must fail on a corrupt chunk");
    assert_eq!(json_lines(&out)[0]["bad"].as_array().unwrap().len(), 1);

    let (ok, out) = keel(&repo, &["prune", "--max-count", "1"]);
    assert!(ok);
    assert_eq!(json_lines(&out)[0]["remove"][0], id.as_str());
    let (ok, out) = keel(&repo, &["gc"]);
    assert!(ok, "{out}");
    let (_, out) = keel(&repo, &["list"]);
    assert_eq!(json_lines(&out).len(), 1);
}

/// kill -9 of a running backup leaves the repository consistent: the
/// earlier point verifies and restores, no half point is listed, and GC
/// sweeps the dead job's chunks. (Wherever the kill lands, these hold.)
#[test]
fn backup_killed_mid_job_leaves_repository_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = dir.path().join("disk.raw");
    let data = keel_testkit::pseudo_random(96 << 20, 0x2545_f491_4f6c_dd1d_u64);
    std::fs::write(&img, &data[..1 << 20]).unwrap();
    let img_s = img.to_str().unwrap();
    let create = [
        "create",
        "--disk",
        "d0",
        "--image",
        img_s,
        "--chunk-size",
        "65536",
    ];
    let (ok, out) = keel(&repo, &create);
    assert!(ok, "{out}");
    let first = json_lines(&out)[0]["id"].as_str().unwrap().to_owned();

    // A big second backup, killed while it runs.
    std::fs::write(&img, &data).unwrap();
    let mut child = Command::new(keel_bin())
        .arg("backup")
        .arg("--repo")
        .arg(&repo)
        .args(create)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();

    let (ok, out) = keel(&repo, &["list"]);
    assert!(ok, "{out}");
    let points = json_lines(&out);
    if status.success() {
        assert_eq!(points.len(), 2, "finished before the kill");
    } else {
        assert_eq!(points.len(), 1, "no half point: {out}");
    }
    let (ok, out) = keel(&repo, &["verify"]);
    assert!(ok, "{out}");
    let (ok, out) = keel(&repo, &["gc"]);
    assert!(ok, "{out}");
    let gc = &json_lines(&out)[0];
    if !status.success() {
        assert!(gc["live_chunks"].as_u64().unwrap() == 16, "{gc}");
    }
    let to = dir.path().join("first.raw");
    let (ok, out) = keel(&repo, &["restore", &first, "--to", to.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&to).unwrap(), &data[..1 << 20]);
}

/// kill -9 of a running GC leaves the repository consistent: the kept
/// point verifies and restores, and the next GC finishes the sweep.
/// (Wherever the kill lands, these hold.)
#[test]
fn gc_killed_mid_sweep_leaves_repository_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    // A seed per length: the two images share no chunk.
    let random =
        |len: usize| keel_testkit::pseudo_random(len, 0x9e37_79b9_7f4a_7c15_u64 ^ len as u64);
    let (kept, dropped) = (random(4 << 20), random(64 << 20));
    let mut ids = Vec::new();
    for (name, data) in [("kept", &kept), ("dropped", &dropped)] {
        let img = dir.path().join(format!("{name}.raw"));
        std::fs::write(&img, data).unwrap();
        let (ok, out) = keel(
            &repo,
            &[
                "create",
                "--disk",
                name,
                "--image",
                img.to_str().unwrap(),
                "--chunk-size",
                "65536",
            ],
        );
        assert!(ok, "{out}");
        ids.push(json_lines(&out)[0]["id"].as_str().unwrap().to_owned());
    }
    // The second point goes: its 1024 chunks are garbage for GC.
    std::fs::remove_file(repo.join("points").join(format!("{}.idx", ids[1]))).unwrap();
    let mut child = Command::new(keel_bin())
        .arg("backup")
        .arg("--repo")
        .arg(&repo)
        .arg("gc")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(40));
    let _ = child.kill(); // SIGKILL
    child.wait().unwrap();

    let (ok, out) = keel(&repo, &["verify"]);
    assert!(ok, "{out}");
    let to = dir.path().join("kept-restored.raw");
    let (ok, out) = keel(&repo, &["restore", &ids[0], "--to", to.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(std::fs::read(&to).unwrap() == kept);
    let (ok, out) = keel(&repo, &["gc"]);
    assert!(ok, "{out}");
    assert_eq!(json_lines(&out)[0]["live_chunks"], 64, "{out}");
    let stored: usize = std::fs::read_dir(repo.join("chunks"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(stored, 64, "only the kept point's chunks are left");
}

/// A repository that fills up: the job fails with the reason and
/// publishes nothing; the earlier point stays intact; GC sweeps the dead
/// job's chunks. (A 12 MiB tmpfs the test mounts and unmounts.)
#[test]
fn a_full_repository_fails_the_job_cleanly_and_keeps_earlier_points() {
    struct Mount(std::path::PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs (the suite runs as root)");
    let _mount = Mount(small.clone());
    let repo = small.join("repo");
    // A seed per length: the two images share no chunk.
    let random =
        |len: usize| keel_testkit::pseudo_random(len, 0x1234_5678_9abc_def1_u64 ^ len as u64);
    let (first, second) = (random(2 << 20), random(32 << 20));
    let img = dir.path().join("disk.raw");
    let create = |img: &Path| {
        let out = Command::new(keel_bin())
            .arg("backup")
            .arg("--repo")
            .arg(&repo)
            .args([
                "create",
                "--disk",
                "d0",
                "--chunk-size",
                "1048576",
                "--image",
            ])
            .arg(img)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    std::fs::write(&img, &first).unwrap();
    let (ok, out, err) = create(&img);
    assert!(ok, "{out}{err}");
    let point = json_lines(&out)[0]["id"].as_str().unwrap().to_owned();
    std::fs::write(&img, &second).unwrap();
    let (ok, out, err) = create(&img);
    assert!(!ok, "32 MiB of random data cannot fit in 12 MiB: {out}");
    assert!(err.contains("No space left"), "{err}");

    let (ok, out) = keel(&repo, &["list"]);
    assert!(ok, "{out}");
    assert_eq!(json_lines(&out).len(), 1, "no half point: {out}");
    let (ok, out) = keel(&repo, &["verify"]);
    assert!(ok, "{out}");
    let (ok, out) = keel(&repo, &["gc"]);
    assert!(ok, "{out}");
    assert_eq!(json_lines(&out)[0]["live_chunks"], 2, "{out}");
    let to = dir.path().join("first.raw");
    let (ok, out) = keel(&repo, &["restore", &point, "--to", to.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(std::fs::read(&to).unwrap() == first);
}

/// Serves the image with `keel vhost-blk --cbt-granularity` (no frontend
/// connects, so nothing is written) and ends it with `signal`.
fn serve_and_stop(dir: &Path, img: &Path, signal: i32) {
    let sock = dir.join("vhost.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(keel_bin())
        .args(["vhost-blk", "--cbt-granularity", "65536", "--socket"])
        .arg(&sock)
        .arg("--image")
        .arg(img)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(sock.exists(), "vhost-blk did not start");
    // SAFETY: plain syscall on our own child's pid.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), signal) };
    child.wait().unwrap();
}

/// The CLI's stopped-disk path: the bitmap `keel vhost-blk` persisted at a
/// clean stop drives an incremental; after a kill -9 it is invalid and the
/// backup falls back to full, saying so.
#[test]
fn cli_incremental_uses_the_persisted_bitmap_and_falls_back_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![5u8; 8 << 20]).unwrap();
    let img_s = img.to_str().unwrap();
    let create = [
        "create",
        "--disk",
        "d0",
        "--image",
        img_s,
        "--chunk-size",
        "1048576",
        "--cbt-granularity",
        "65536",
    ];
    let (ok, out) = keel(&repo, &create);
    assert!(ok, "{out}");
    assert!(json_lines(&out)[0]["fallback"]
        .as_str()
        .unwrap()
        .contains("no CBT file"));

    serve_and_stop(dir.path(), &img, libc::SIGTERM);
    let (ok, out) = keel(&repo, &create);
    assert!(ok, "{out}");
    assert_eq!(json_lines(&out)[0]["kind"], "full", "first of the chain");
    let (ok, out) = keel(&repo, &create);
    assert!(ok, "{out}");
    let r = &json_lines(&out)[0];
    assert_eq!(
        (r["kind"].as_str(), r["chunks_read"].as_u64()),
        (Some("incremental"), Some(0))
    );

    serve_and_stop(dir.path(), &img, libc::SIGKILL);
    let (ok, out) = keel(&repo, &create);
    assert!(ok, "{out}");
    let r = &json_lines(&out)[0];
    assert_eq!(r["kind"], "full");
    assert!(r["fallback"].as_str().unwrap().contains("invalid"), "{r}");
}

#[test]
fn encrypted_points_hide_their_data_and_need_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = dir.path().join("disk.raw");
    let mut data = vec![0u8; 8 << 20];
    let marker = b"KEEL-PLAINTEXT-MARKER ";
    for (i, b) in data[..2 << 20].iter_mut().enumerate() {
        *b = marker[i % marker.len()];
    }
    std::fs::write(&img, &data).unwrap();
    let (key, other) = (dir.path().join("vdc.key"), dir.path().join("other.key"));
    let run = |args: &[&str]| -> (bool, String, String) {
        let out = Command::new(keel_bin())
            .arg("backup")
            .arg("--repo")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["keygen", key.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let fingerprint = json_lines(&out)[0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the key file is private");
    let (ok, _, err) = run(&["keygen", key.to_str().unwrap()]);
    assert!(!ok && err.contains("not overwriting"), "{err}");
    assert!(run(&["keygen", other.to_str().unwrap()]).0);

    let with = |k: &Path, rest: &[&str]| -> (bool, String, String) {
        let mut args = vec!["--key-file", k.to_str().unwrap()];
        args.extend_from_slice(rest);
        run(&args)
    };
    let create = ["create", "--disk", "d0", "--image", img.to_str().unwrap()];
    let (ok, out, err) = with(&key, &create);
    assert!(ok, "{out}{err}");
    let point = json_lines(&out)[0]["id"].as_str().unwrap().to_owned();
    let (_, out, _) = run(&["list"]);
    assert_eq!(json_lines(&out)[0]["encryption"], fingerprint.as_str());
    // Nothing in the repository reads as the disk's data.
    for shard in std::fs::read_dir(repo.join("chunks")).unwrap() {
        for chunk in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let bytes = std::fs::read(chunk.unwrap().path()).unwrap();
            assert!(!bytes.windows(marker.len()).any(|w| w == marker));
        }
    }
    // Within one key chunks still deduplicate.
    let (ok, out, _) = with(&key, &create);
    assert!(ok);
    assert_eq!(json_lines(&out)[0]["chunks_stored"], 0, "{out}");

    let target = dir.path().join("restored.raw");
    let (ok, _, err) = run(&["restore", &point, "--to", target.to_str().unwrap()]);
    assert!(
        !ok && err.contains(&format!("encrypted with key {fingerprint}")),
        "{err}"
    );
    let (ok, _, err) = with(
        &other,
        &["restore", &point, "--to", target.to_str().unwrap()],
    );
    assert!(!ok && err.contains("the key given is"), "{err}");
    assert!(!target.exists(), "a refused restore leaves no file");
    let (ok, out, err) = with(&key, &["restore", &point, "--to", target.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert_eq!(std::fs::read(&target).unwrap(), data);
    let (ok, out, err) = with(&key, &["verify", &point]);
    assert!(ok, "{out}{err}");

    // A flipped bit in a sealed chunk fails verify with where it is used.
    let shard = std::fs::read_dir(repo.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read_dir(p).unwrap().next().is_some())
        .unwrap();
    let chunk = std::fs::read_dir(shard)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&chunk, &bytes).unwrap();
    let (ok, out, _) = with(&key, &["verify", &point]);
    assert!(!ok);
    let report = &json_lines(&out)[0];
    assert_eq!(report["bad"][0]["point"], point.as_str(), "{report}");
    assert!(
        report["bad"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("decrypt"),
        "{report}"
    );
}
