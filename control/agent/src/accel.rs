//! Choosing KVM or TCG. `/dev/kvm` can exist while KVM guests hang (nested
//! virtualization not exposed), so `auto` boots the host's own kernel under
//! KVM once per machine boot and takes TCG unless it prints its banner.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::domain_xml::Accel;

const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
const BANNER: &[u8] = b"Linux version";

/// Probes (or reads the cached answer for this boot from `cache_dir`).
pub fn detect(cache_dir: &Path) -> Accel {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = cache_dir.join(format!("kvm-probe-{}", boot_id.trim()));
    if let Ok(answer) = std::fs::read_to_string(&cache) {
        return if answer.trim() == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
    }
    let accel = match newest_kernel() {
        Some(kernel) => probe(&kernel),
        // Nothing to boot: trust the device.
        None => Accel::Kvm,
    };
    let _ = std::fs::create_dir_all(cache_dir);
    let _ = std::fs::write(&cache, if accel == Accel::Kvm { "kvm" } else { "tcg" });
    tracing::info!(?accel, "hardware acceleration probed");
    accel
}

fn newest_kernel() -> Option<std::path::PathBuf> {
    let mut kernels: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels.pop()
}

fn probe(kernel: &Path) -> Accel {
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-nographic",
            "-nodefaults",
        ])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Accel::Tcg;
    };
    let Some(mut out) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Accel::Tcg;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(BANNER.len()).any(|w| w == BANNER) {
                let _ = tx.send(());
                return;
            }
        }
    });
    let start = Instant::now();
    let ok = rx
        .recv_timeout(PROBE_TIMEOUT.saturating_sub(start.elapsed()))
        .is_ok();
    let _ = child.kill();
    let _ = child.wait();
    if ok {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}
