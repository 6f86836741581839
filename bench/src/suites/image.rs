//! `image`: the appliance image's size and its boot-to-API-ready time.
//!
//! Size peer: Debian's own initramfs-tools initrd for the same kernel
//! (`/boot/initrd.img-<version>`), which only gets a generic system to its
//! root file system; the appliance's initramfs *is* the whole system,
//! keel included.
//!
//! Boot peer: the same kernel and command line with a minimal busybox
//! initramfs whose `/init` prints a marker: the floor set by QEMU, the
//! firmware and the kernel. The ratio says what the appliance's bring-up
//! (modules, DHCP, keel starting and serving `/healthz`) adds on top. Both
//! boot under TCG unless `KEEL_BENCH_ACCEL=kvm`, alternating.

use std::path::Path;
use std::time::{Duration, Instant};

use keel_firmware::appliance::{self, ImageConfig, DEFAULT_CMDLINE};
use keel_firmware::cpio::{CpioTree, Node};
use keel_firmware::qemu::QemuVm;

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "image",
    about: "appliance image size and boot-to-API time vs. Debian's initrd / a bare kernel boot",
    run,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const PEER_MARKER: &str = "KEEL_BENCH_INIT_REACHED";

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    let rounds = match scale {
        Scale::Quick => 1,
        Scale::Full => 3,
    };
    let keel = std::env::current_exe()?;
    let scratch = tempfile::Builder::new()
        .prefix("keel-bench-image-")
        .tempdir()?;
    let mut config = ImageConfig::new(scratch.path(), &keel)?;
    config.disk = false;
    let report = appliance::build(&config)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);

    let debian_initrd = Path::new("/boot").join(format!("initrd.img-{}", report.kernel_version));
    let mut results = Vec::new();
    let size = Measurement::new(
        "initramfs size (zstd)",
        "MiB",
        false,
        mib(report.initramfs.bytes),
    );
    results.push(match std::fs::metadata(&debian_initrd) {
        Ok(meta) => size.with_peer(
            "Debian initramfs-tools initrd, same kernel",
            mib(meta.len()),
        ),
        Err(_) => size,
    });
    results.push(Measurement::new(
        "kernel + initramfs",
        "MiB",
        false,
        mib(report.kernel.bytes + report.initramfs.bytes),
    ));

    let peer_initrd = scratch.path().join("peer-initramfs.cpio");
    std::fs::write(&peer_initrd, peer_initramfs()?)?;
    let accel: &[&str] = match std::env::var("KEEL_BENCH_ACCEL").as_deref() {
        Ok("kvm") => &["-accel", "kvm", "-cpu", "host"],
        _ => &["-accel", "tcg", "-cpu", "max"],
    };
    let boot_args = |initrd: &Path| {
        vec![
            "-kernel".to_string(),
            report.kernel.path.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            DEFAULT_CMDLINE.into(),
        ]
    };
    let (mut keel_secs, mut peer_secs) = (0.0, 0.0);
    for _ in 0..rounds {
        let start = Instant::now();
        let mut vm = QemuVm::start("bench-appliance", accel, &boot_args(&report.initramfs.path))?;
        vm.wait_api(BOOT_TIMEOUT)?;
        keel_secs += start.elapsed().as_secs_f64();
        drop(vm);

        let start = Instant::now();
        let mut vm = QemuVm::start("bench-peer", accel, &boot_args(&peer_initrd))?;
        vm.wait_console(PEER_MARKER, BOOT_TIMEOUT)?;
        peer_secs += start.elapsed().as_secs_f64();
        drop(vm);
    }
    let accel_name = if accel.contains(&"kvm") { "kvm" } else { "tcg" };
    results.push(
        Measurement::new(
            &format!("boot to API ready ({accel_name})"),
            "s",
            false,
            keel_secs / f64::from(rounds),
        )
        .with_peer(
            "same kernel, busybox /init printing a marker",
            peer_secs / f64::from(rounds),
        ),
    );
    Ok(results)
}

/// The peer's initramfs: busybox and an `/init` that only prints.
fn peer_initramfs() -> Result<Vec<u8>, BenchError> {
    let mut tree = CpioTree::new();
    tree.dir("dev");
    tree.insert("dev/console", Node::CharDevice { major: 5, minor: 1 });
    tree.file("bin/busybox", 0o755, std::fs::read("/bin/busybox")?);
    tree.file(
        "init",
        0o755,
        format!(
            "#!/bin/busybox sh\n/bin/busybox echo {PEER_MARKER}\nexec /bin/busybox sleep 3600\n"
        )
        .into_bytes(),
    );
    Ok(tree.write(0)?)
}
