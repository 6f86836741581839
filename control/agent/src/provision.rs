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

pub fn create_blank(dest: &Path, size: u64, thick: bool) -> Result<(), ProvisionError> {
    prepare(dest)?;
    run(
        "create",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw", "-o", prealloc(thick)])
            .arg(dest)
            .arg(size.to_string()),
    )
}

/// Grows a raw volume to `size` bytes (thick: the new space allocated).
pub fn grow(dest: &Path, size: u64, thick: bool) -> Result<(), ProvisionError> {
    run(
        "resize",
        Command::new("qemu-img")
            .args(["resize", "-q", "-f", "raw", "--preallocation"])
            .arg(if thick { "falloc" } else { "off" })
            .arg(dest)
            .arg(size.to_string()),
    )
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

/// Copies `image` to a raw `dest` of at least `size` bytes, calling
/// `progress` with whole percents as qemu-img reports them.
pub fn copy_image(
    image: &Path,
    format: &str,
    dest: &Path,
    size: u64,
    thick: bool,
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
            "raw",
            "-o",
            prealloc(thick),
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
    let current = std::fs::metadata(&partial)
        .map_err(|source| ProvisionError::Io {
            path: partial.display().to_string(),
            source,
        })?
        .len();
    if size > current {
        run(
            "resize",
            Command::new("qemu-img")
                .args(["resize", "-q", "-f", "raw"])
                .arg(&partial)
                .arg(size.to_string()),
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
}
