//! qcow2 against QEMU's own tool: images qemu-img writes read back the
//! same through keel, images keel writes pass `qemu-img check` and convert
//! back to the bytes written.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // small test sizes; patterns wrap on purpose

use std::path::Path;

use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    keel_testkit::run(&[&["qemu-img"], args].concat())
        .unwrap()
        .stdout
}

/// Deterministic bytes, so failures reproduce.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    keel_testkit::pseudo_random(len, seed)
}

/// A raw disk with data clusters, zero clusters and unaligned data.
fn sample_raw(size: u64) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (i, at) in [0u64, 3 * MIB + 4096, 5 * MIB - 512, size - 70_000]
        .into_iter()
        .enumerate()
    {
        let p = pattern(150_000.min((size - at) as usize), i as u64 + 7);
        d[at as usize..at as usize + p.len()].copy_from_slice(&p);
    }
    d
}

fn convert_to_raw(img: &Path, out: &Path) -> Vec<u8> {
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

fn check_clean(img: &Path) {
    let out = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(
            v.get(key).map_or(0, |x| x.as_u64().unwrap()),
            0,
            "{key}: {out}"
        );
    }
}

#[test]
fn images_qemu_img_writes_read_the_same_through_keel() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let raw = dir.path().join("src.raw");
    let want = sample_raw(size);
    std::fs::write(&raw, &want).unwrap();
    for (cs, compress) in [
        (64 << 10, false),
        (128 << 10, false),
        (256 << 10, false),
        (512 << 10, false),
        (1 << 20, false),
        (2 << 20, false),
        (64 << 10, true),
    ] {
        let img = dir.path().join(format!("{cs}-{compress}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if compress {
            args.push("-c");
        }
        let opt = format!("cluster_size={cs}");
        args.extend(["-o", &opt, raw.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(&args);
        let q = Qcow2::open(&img, true).unwrap();
        assert_eq!(q.size(), size);
        let mut got = vec![0xeeu8; size as usize];
        q.read_at(0, &mut got).unwrap();
        assert!(got == want, "cluster size {cs}, compressed {compress}");
    }
}

/// Writes, zeroes and discards through keel, then checks the image with
/// qemu-img and against a model of the disk.
fn exercise(img: &Path, model: &mut [u8], seed: u64, ops: usize) {
    let q = Qcow2::open(img, false).unwrap();
    let size = model.len() as u64;
    let mut x = seed | 1;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    for i in 0..ops {
        let at = next(size / 512) * 512;
        let len = ((next(300_000) / 512 + 1) * 512).min(size - at);
        match next(8) {
            0 => {
                q.discard(at, len, true, next(2) == 0).unwrap();
                model[at as usize..(at + len) as usize].fill(0);
            }
            1 => {
                // A discard leaves whole clusters reading zeros, partial
                // ones as they were.
                q.discard(at, len, false, true).unwrap();
                let cs = q.cs();
                let (from, to) = (at.next_multiple_of(cs), (at + len) / cs * cs);
                if from < to {
                    model[from as usize..to as usize].fill(0);
                }
            }
            _ => {
                let data = pattern(len as usize, seed * 1000 + i as u64);
                q.write_at(at, &data).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
        }
        if next(10) == 0 {
            q.flush().unwrap();
        }
    }
    let mut got = vec![0u8; model.len()];
    q.read_at(0, &mut got).unwrap();
    assert!(got == model, "keel reads back what it wrote");
    q.close().unwrap();
}

#[test]
fn images_keel_writes_pass_qemu_img_check_and_convert_back() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    for (k, cs) in [
        64u64 << 10,
        128 << 10,
        256 << 10,
        512 << 10,
        1 << 20,
        2 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("{cs}.qcow2"));
        create(
            &img,
            &CreateOptions {
                size,
                cluster_size: cs,
                backing: None,
            },
        )
        .unwrap();
        check_clean(&img);
        let mut model = vec![0u8; size as usize];
        exercise(&img, &mut model, k as u64 + 1, 60);
        check_clean(&img);
        let out = dir.path().join(format!("{cs}.raw"));
        assert!(convert_to_raw(&img, &out) == model, "cluster size {cs}");
        // And again after reopening (metadata as written).
        exercise(&img, &mut model, k as u64 + 100, 20);
        check_clean(&img);
        assert!(
            convert_to_raw(&img, &out) == model,
            "cluster size {cs}, reopened"
        );
    }
}

#[test]
fn writes_over_backing_files_copy_the_rest_of_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let base = sample_raw(size);
    let base_raw = dir.path().join("base.raw");
    std::fs::write(&base_raw, &base).unwrap();
    let base_qcow2 = dir.path().join("base.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-c",
        base_raw.to_str().unwrap(),
        base_qcow2.to_str().unwrap(),
    ]);
    for (name, format) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        let top = dir.path().join(format!("top-{format}.qcow2"));
        create(
            &top,
            &CreateOptions {
                size,
                cluster_size: 128 << 10,
                backing: Some((name.into(), format.into())),
            },
        )
        .unwrap();
        let mut model = base.clone();
        exercise(&top, &mut model, 42, 40);
        check_clean(&top);
        let info = qemu_img(&["info", "--output=json", top.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"backing-filename-format\": \"{format}\"")),
            "{info}"
        );
        let out = dir.path().join("top.raw");
        assert!(
            convert_to_raw(&top, &out) == model,
            "over a {format} backing file"
        );
    }
    // A top image qemu-img made over keel's: QEMU's view through keel.
    let top = dir.path().join("qemu-top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "top-raw.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let q = Qcow2::open(&top, true).unwrap();
    let mut got = vec![0u8; size as usize];
    q.read_at(0, &mut got).unwrap();
    assert!(got == convert_to_raw(&top, &dir.path().join("x.raw")));
}

#[test]
fn images_keel_cannot_write_safely_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    // Internal snapshots: reading is fine, writing would need COW.
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    assert!(Qcow2::open(&img, true).is_ok());
    let e = Qcow2::open(&img, false).unwrap_err().to_string();
    assert!(e.contains("internal snapshots"), "{e}");
    // Refcounts of another width.
    let b = dir.path().join("b.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=8",
        b.to_str().unwrap(),
        "8M",
    ]);
    let e = Qcow2::open(&b, false).unwrap_err().to_string();
    assert!(e.contains("8-bit refcounts"), "{e}");
    // A raw file is not qcow2.
    let r = dir.path().join("r.raw");
    std::fs::write(&r, vec![0u8; 1 << 20]).unwrap();
    let e = Qcow2::open(&r, true).unwrap_err().to_string();
    assert!(e.contains("no qcow2 magic"), "{e}");
    // The dirty flag (lazy refcounts after a crash).
    let d = dir.path().join("d.qcow2");
    qemu_img(&["create", "-f", "qcow2", d.to_str().unwrap(), "8M"]);
    let f = OpenOptions::new().write(true).open(&d).unwrap();
    f.write_all_at(&header::INCOMPAT_DIRTY.to_be_bytes(), 72)
        .unwrap();
    let e = Qcow2::open(&d, false).unwrap_err().to_string();
    assert!(e.contains("qemu-img check -r all"), "{e}");
    // A missing backing file names the path.
    let t = dir.path().join("t.qcow2");
    create(
        &t,
        &CreateOptions {
            size: 8 * MIB,
            cluster_size: 64 << 10,
            backing: Some(("gone.raw".into(), "raw".into())),
        },
    )
    .unwrap();
    let e = Qcow2::open(&t, false).unwrap_err();
    assert!(
        matches!(&e, Qcow2Error::Backing { path, .. } if path.ends_with("gone.raw")),
        "{e}"
    );
    // Bad creation parameters.
    for (size, cs) in [(8 * MIB, 4096), (8 * MIB, 3 << 16), (1000, 64 << 10)] {
        let p = dir.path().join("bad.qcow2");
        let r = create(
            &p,
            &CreateOptions {
                size,
                cluster_size: cs,
                backing: None,
            },
        );
        assert!(matches!(r, Err(Qcow2Error::Invalid(_))));
        assert!(!p.exists());
    }
}

/// One valid image with data, L2 tables and a backing-file-less header.
fn fuzz_seed(dir: &Path) -> Vec<u8> {
    let img = dir.join("seed.qcow2");
    create(
        &img,
        &CreateOptions {
            size: 4 * MIB,
            cluster_size: 64 << 10,
            backing: None,
        },
    )
    .unwrap();
    let q = Qcow2::open(&img, false).unwrap();
    q.write_at(0, &pattern(100_000, 3)).unwrap();
    q.write_at(3 * MIB, &pattern(70_000, 4)).unwrap();
    q.close().unwrap();
    std::fs::read(&img).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A hostile image (any bytes of its metadata changed) gives an error
    /// or a disk whose every read and write stays in bounds: never a panic.
    #[test]
    fn corrupted_metadata_never_panics(
        flips in prop::collection::vec((0usize..7 * 65536, any::<u8>()), 1..12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = fuzz_seed(dir.path());
        for (at, b) in flips {
            if let Some(x) = bytes.get_mut(at) {
                *x = b;
            }
        }
        let img = dir.path().join("fuzz.qcow2");
        std::fs::write(&img, &bytes).unwrap();
        for readonly in [true, false] {
            if let Ok(q) = Qcow2::open(&img, readonly) {
                let size = q.size().min(8 * MIB) as usize;
                let mut buf = vec![0u8; size];
                let _ = q.read_at(0, &mut buf);
                if !readonly && size > 0 {
                    let _ = q.write_at(0, &buf[..size.min(200_000)]);
                    let _ = q.discard(0, size as u64, false, true);
                    let _ = q.close();
                }
            }
        }
    }
}
