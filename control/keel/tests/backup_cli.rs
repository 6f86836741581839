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
