//! Volume files: blank (sparse, or allocated for thick provisioning) or a
//! raw copy of an image, made with `qemu-img` (it reads every image format
//! keel accepts and keeps holes sparse), with its progress reported.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("Cannot run qemu-img (install qemu-utils)")]
    Spawn(#[source] std::io::Error),
    #[error("{step} failed: {stderr}")]
    Failed { step: &'static str, stderr: String },
    #[error("Cannot prepare {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Image format names as qemu-img spells them.
pub fn qemu_format(format: &str) -> &str {
    match format {
        "qcow2" => "qcow2",
        _ => "raw",
    }
}

fn run(step: &'static str, cmd: &mut Command) -> Result<(), ProvisionError> {
    let out = cmd.output().map_err(ProvisionError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ProvisionError::Failed {
            step,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn prealloc(thick: bool) -> &'static str {
    if thick {
        "preallocation=falloc"
    } else {
        "preallocation=off"
    }
}

fn prepare(dest: &Path) -> Result<(), ProvisionError> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ProvisionError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// The file a volume is made as.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `raw` or `qcow2`.
    pub format: &'a str,
    /// qcow2 cluster size in bytes.
    pub cluster_size: Option<u64>,
    /// Raw only: allocate every block now.
    pub thick: bool,
}

impl Target<'_> {
    fn qcow2(&self) -> bool {
        self.format == "qcow2"
    }

    /// qemu-img's creation options for this target.
    fn options(&self) -> String {
        if self.qcow2() {
            format!("cluster_size={}", self.cluster_size.unwrap_or(64 << 10))
        } else {
            prealloc(self.thick).into()
        }
    }
}

/// A blank volume: raw through qemu-img, qcow2 through keel's own qcow2
/// code (the one that serves it).
pub fn create_blank(dest: &Path, size: u64, target: Target<'_>) -> Result<(), ProvisionError> {
    prepare(dest)?;
    if target.qcow2() {
        let opts = keel_vhost::qcow2::CreateOptions {
            size,
            cluster_size: target.cluster_size.unwrap_or(64 << 10),
            backing: None,
        };
        return keel_vhost::qcow2::create(dest, &opts).map_err(|e| ProvisionError::Failed {
            step: "create",
            stderr: e.to_string(),
        });
    }
    let thick = target.thick;
    run(
        "create",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw", "-o", prealloc(thick)])
            .arg(dest)
            .arg(size.to_string()),
    )
}

/// Grows a volume to `size` bytes (thick raw: the new space allocated;
/// qcow2: the L1 table grows, nothing else is written). Not while served.
pub fn grow(dest: &Path, size: u64, target: Target<'_>) -> Result<(), ProvisionError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["resize", "-q", "-f", qemu_format(target.format)]);
    if !target.qcow2() {
        cmd.args([
            "--preallocation",
            if target.thick { "falloc" } else { "off" },
        ]);
    }
    run("resize", cmd.arg(dest).arg(size.to_string()))
}

/// The virtual size qemu-img reports for an image file.
pub fn virtual_size(image: &Path, format: &str) -> Result<u64, ProvisionError> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", qemu_format(format)])
        .arg(image)
        .output()
        .map_err(ProvisionError::Spawn)?;
    if !out.status.success() {
        return Err(ProvisionError::Failed {
            step: "info",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| ProvisionError::Failed {
            step: "info",
            stderr: e.to_string(),
        })?;
    info["virtual-size"]
        .as_u64()
        .ok_or_else(|| ProvisionError::Failed {
            step: "info",
            stderr: "no virtual-size in its answer".into(),
        })
}

/// Copies `image` to `dest` (raw or qcow2) of at least `size` bytes,
/// calling `progress` with whole percents as qemu-img reports them.
pub fn copy_image(
    image: &Path,
    format: &str,
    dest: &Path,
    size: u64,
    target: Target<'_>,
    mut progress: impl FnMut(u8),
) -> Result<(), ProvisionError> {
    prepare(dest)?;
    let partial = dest.with_extension("partial");
    let mut child = Command::new("qemu-img")
        .args([
            "convert",
            "-p",
            "-f",
            qemu_format(format),
            "-O",
            qemu_format(target.format),
            "-o",
            &target.options(),
        ])
        .arg(image)
        .arg(&partial)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ProvisionError::Spawn)?;
    // qemu-img -p writes "    (12.34/100%)\r" updates.
    if let Some(mut out) = child.stdout.take() {
        let mut buf = [0u8; 256];
        let mut line = Vec::new();
        let mut last = 0u8;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    if let Some(p) = parse_progress(&line) {
                        if p != last {
                            last = p;
                            progress(p);
                        }
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
    }
    let out = child.wait_with_output().map_err(ProvisionError::Spawn)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(ProvisionError::Failed {
            step: "convert",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let current = virtual_size(&partial, target.format)?;
    if size > current {
        grow(
            &partial,
            size,
            Target {
                thick: false,
                ..target
            },
        )?;
    }
    std::fs::rename(&partial, dest).map_err(|source| ProvisionError::Io {
        path: dest.display().to_string(),
        source,
    })
}

fn parse_progress(line: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let inner = text.strip_prefix('(')?.strip_suffix("%)")?;
    let (done, _) = inner.split_once('/')?;
    let pct: f64 = done.parse().ok()?;
    // Clamped to 0..=100 before the cast, so it cannot truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(pct.clamp(0.0, 100.0) as u8)
}

/// Copies a volume file keeping its holes (and sharing extents where the
/// file system can), published atomically under `dest`.
pub fn copy_file(src: &Path, dest: &Path) -> Result<(), ProvisionError> {
    prepare(dest)?;
    let partial = dest.with_extension("partial");
    run(
        "copy",
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(src)
            .arg(&partial),
    )?;
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::rename(&partial, dest))
        .map_err(|source| ProvisionError::Io {
            path: dest.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(parse_progress(b"    (12.34/100%)"), Some(12));
        assert_eq!(parse_progress(b"    (100.00/100%)"), Some(100));
        assert_eq!(parse_progress(b"garbage"), None);
    }

    /// An image copied into a qcow2 volume (bigger than the image) and a
    /// blank qcow2 volume: both read back through keel's qcow2 code as
    /// the image's bytes followed by zeros, at the cluster size asked.
    #[test]
    fn qcow2_volumes_from_an_image_and_blank() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &data).unwrap();
        let target = Target {
            format: "qcow2",
            cluster_size: Some(128 << 10),
            thick: false,
        };
        let dest = dir.path().join("v.qcow2");
        let mut seen = Vec::new();
        copy_image(&image, "raw", &dest, 8 << 20, target, |p| seen.push(p)).unwrap();
        assert_eq!(virtual_size(&dest, "qcow2").unwrap(), 8 << 20);
        let q = keel_vhost::qcow2::Qcow2::open(&dest, true).unwrap();
        let mut got = vec![0xffu8; 8 << 20];
        q.read_at(0, &mut got).unwrap();
        assert!(got[..data.len()] == data[..]);
        assert!(got[data.len()..].iter().all(|&b| b == 0));
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&dest)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["cluster-size"], 128 << 10, "{info}");

        let blank = dir.path().join("b.qcow2");
        create_blank(&blank, 1 << 30, target).unwrap();
        assert_eq!(virtual_size(&blank, "qcow2").unwrap(), 1 << 30);
        grow(&blank, 2 << 30, target).unwrap();
        assert_eq!(virtual_size(&blank, "qcow2").unwrap(), 2 << 30);
        assert!(keel_vhost::qcow2::Qcow2::open(&blank, false).is_ok());
    }
}
