//! The appliance image, built and booted for real: twice-built images are
//! byte-identical; the kernel + initramfs pair (QEMU direct-kernel boot)
//! and the disk image (OVMF with and without secure boot, and SeaBIOS) boot
//! to a keel API that answers on a forwarded loopback port; the state partition keeps keel's identity
//! across a power cycle; with an API token on its command line the
//! appliance joins a control plane outside and its host registers there.
//!
//! Needs the `keel` binary built (`cargo build -p keel`, done by
//! `cargo test --workspace`), QEMU, OVMF and the image tools from keel.sh's
//! TEST_PACKAGES. The image is cached under `target/keel-firmware/`.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use keel_firmware::appliance::{self, ImageConfig, ImageReport};
use keel_firmware::disk::BootLoader;
use keel_firmware::guest_firmware::{BootFirmware, FirmwareFiles};
use keel_firmware::qemu::QemuVm;
use keel_testkit::{keel_bin, target_dir, Accel, KeelProcess, PostgresServer};

/// Boot to API-ready takes ~10 s direct and ~30 s through OVMF under TCG
/// on an idle machine; CI builds and boots in parallel.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(90);

fn config(out: &Path) -> ImageConfig {
    let bin = keel_bin();
    assert!(
        bin.exists(),
        "{} missing: build it first (cargo build -p keel)",
        bin.display()
    );
    let mut config = ImageConfig::new(out, &bin).unwrap();
    config.source_date_epoch = 1_700_000_000;
    config
}

/// The image every boot test uses: built once per test process, and
/// across runs cached under target/ by its inputs' cache key.
fn image() -> &'static (PathBuf, ImageReport) {
    static IMAGE: OnceLock<(PathBuf, ImageReport)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = target_dir().join("keel-firmware");
        fs::create_dir_all(&root).unwrap();
        let lock = File::create(root.join("build.lock")).unwrap();
        lock.lock().unwrap();
        let probe = config(&root);
        let dir = root.join(format!("image-{}", probe.cache_key()));
        // Images of older inputs are never used again: keep only this one.
        for entry in fs::read_dir(&root).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("image-") && entry.path() != dir {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let mut config = probe;
        config.out_dir = dir.clone();
        let report = appliance::build_cached(&config).unwrap();
        println!("{report}");
        (dir, report)
    })
}

/// The second build goes through the CLI (`keel image build`, with
/// `SOURCE_DATE_EPOCH` from the environment) so the command is covered too.
#[test]
fn image_builds_byte_identical_from_the_same_inputs() {
    let (cached, first) = image();
    let fresh = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(keel_bin())
        .args(["image", "build", "--out"])
        .arg(fresh.path())
        .arg("--keel-bin")
        .arg(keel_bin())
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI prints every file's size and the image digest.
    assert!(stdout.contains("initramfs.img"), "{stdout}");
    let digest: String = first.digest.iter().map(|b| format!("{b:02x}")).collect();
    assert!(stdout.contains(&format!("sha256: {digest}")), "{stdout}");
    for name in ["vmlinuz", "initramfs.img", "keel.ipxe", "disk.img"] {
        let a = fs::read(cached.join(name)).unwrap();
        let b = fs::read(fresh.path().join(name)).unwrap();
        assert!(a == b, "{name} differs between two builds");
    }
}

#[test]
fn initramfs_holds_the_appliance_and_nothing_to_log_in_with() {
    let (dir, _) = image();
    let cpio = zstd::decode_all(File::open(dir.join("initramfs.img")).unwrap()).unwrap();
    let mut names = Vec::new();
    let mut rest = &cpio[..];
    loop {
        let reader = cpio::newc::Reader::new(rest).unwrap();
        if reader.entry().is_trailer() {
            break;
        }
        assert_eq!(reader.entry().uid(), 0);
        assert_eq!(reader.entry().mtime(), 1_700_000_000);
        names.push(reader.entry().name().to_owned());
        rest = reader.finish().unwrap();
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for needed in [
        "init",
        "usr/bin/keel",
        "sbin/ip",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib/modules/virtio_net.ko",
        "lib/modules/ext4.ko",
        "lib/modules/crc32c_generic.ko",
        "etc/inittab",
        "etc/keel/rc.sysinit",
        "etc/acpi/PWRF/00000080",
    ] {
        assert!(names.contains(&needed), "{needed} missing from the image");
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are written in path order");
    let inittab =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rootfs/inittab")).unwrap();
    assert!(
        !inittab
            .lines()
            .any(|l| !l.starts_with('#') && l.contains("getty")),
        "no login prompt on any console"
    );
}

#[test]
fn direct_kernel_boot_serves_the_api_and_keeps_state_across_a_power_cycle() {
    let (dir, report) = image();
    let run = tempfile::tempdir().unwrap();
    // A private copy: the state partition on it is written. The copy is
    // 64 MiB larger, as when the image is written to a larger disk.
    let disk = run.path().join("disk.img");
    fs::copy(dir.join("disk.img"), &disk).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    file.set_len(file.metadata().unwrap().len() + (64 << 20))
        .unwrap();
    drop(file);
    let drive = format!("file={},format=raw,if=virtio", disk.display());
    let boot = |label: &str| {
        Vm::start(
            label,
            &[
                "-kernel".into(),
                dir.join("vmlinuz").display().to_string(),
                "-initrd".into(),
                dir.join("initramfs.img").display().to_string(),
                "-append".into(),
                report.cmdline.clone(),
                "-drive".into(),
                drive.clone(),
            ],
        )
    };

    let mut vm = boot("direct-1");
    vm.wait_api();
    let first_id = vm.instance_id();
    let console = vm.console();
    says(&console, &["keel-init: state on /dev/vda2 (persistent)"]);
    // The state partition took the rest of the disk: its 64 MiB, the
    // 1 MiB the image keeps for the backup GPT, and the 64 MiB added.
    says(
        &console,
        &[
            "keel-init: state partition /dev/vda2 grown to 128 MiB",
            "keel-init: eth0: dhcp 10.0.2.15/24",
            "keel-init: root file system is read-only",
        ],
    );
    assert!(!console.contains("login:"), "{console}");
    vm.power_button_and_wait();
    assert!(
        vm.console().contains("keel-init: stopped"),
        "{}",
        vm.console()
    );

    let mut vm = boot("direct-2");
    vm.wait_api();
    assert_eq!(
        vm.instance_id(),
        first_id,
        "state partition kept keel's identity"
    );
    assert!(
        !vm.console().contains("grown"),
        "grown once: {}",
        vm.console()
    );
    vm.power_button_and_wait();
}

#[test]
fn direct_kernel_boot_with_a_static_address_and_no_state_disk() {
    let (dir, report) = image();
    // QEMU's user network is 10.0.2.0/24 with its gateway at .2; hostfwd
    // forwards to .15, the address its DHCP server would have handed out.
    let cmdline = format!("{} keel.ip=10.0.2.15/24 keel.gw=10.0.2.2", report.cmdline);
    // SeaBIOS, chosen through the guest-firmware selection, runs QEMU's
    // direct-kernel loader.
    let mut args = BootFirmware::Bios
        .qemu_args(&FirmwareFiles::default(), None)
        .unwrap();
    args.extend([
        "-kernel".into(),
        dir.join("vmlinuz").display().to_string(),
        "-initrd".into(),
        dir.join("initramfs.img").display().to_string(),
        "-append".into(),
        cmdline,
    ]);
    let mut vm = Vm::start("direct-static", &args);
    vm.wait_api();
    let console = vm.console();
    says(
        &console,
        &["keel-init: eth0: static 10.0.2.15/24 via 10.0.2.2"],
    );
    assert!(console.contains("keel-init: state on tmpfs"), "{console}");
    assert!(!console.contains("udhcpc"), "{console}");
    vm.power_button_and_wait();
}

#[test]
fn uefi_disk_image_boots_with_ovmf_and_serves_the_api() {
    let (dir, _) = image();
    let run = tempfile::tempdir().unwrap();
    let disk = run.path().join("disk.img");
    fs::copy(dir.join("disk.img"), &disk).unwrap();
    // OVMF with this VM's own NVRAM, created from OVMF_VARS.fd by the
    // guest-firmware module, as keel does for a UEFI guest.
    let uefi = BootFirmware::Uefi { secure_boot: false };
    let files = FirmwareFiles::default();
    let nvram = uefi.ensure_nvram(&files, run.path()).unwrap().unwrap();
    let mut args = uefi.qemu_args(&files, Some(&nvram)).unwrap();
    args.extend([
        "-drive".into(),
        format!("file={},format=raw,if=virtio", disk.display()),
    ]);
    let mut vm = Vm::start("uefi", &args);
    vm.wait_api();
    let console = vm.console();
    says(
        &console,
        &[
            "keel-init: state on /dev/vda2 (persistent)",
            "keel-init: booted by UEFI, secure boot off",
        ],
    );
    vm.power_button_and_wait();
}

/// The disk's boot chain is signed (shim by Microsoft's UEFI CA, GRUB and
/// the kernel by Debian): OVMF with Microsoft's keys enrolled and secure
/// boot enforced boots it to the API, with the kernel locked down. The same
/// kernel and initramfs behind the unsigned systemd-boot are refused by the
/// firmware: secure boot is really enforced.
#[test]
fn secure_boot_firmware_boots_the_signed_disk_and_refuses_an_unsigned_loader() {
    let (dir, report) = image();
    let run = tempfile::tempdir().unwrap();
    let secure = BootFirmware::Uefi { secure_boot: true };
    let files = FirmwareFiles::default();
    let boot = |label: &str, disk: &Path| {
        let vm_dir = run.path().join(label);
        fs::create_dir(&vm_dir).unwrap();
        let nvram = secure.ensure_nvram(&files, &vm_dir).unwrap().unwrap();
        let mut args = secure.qemu_args(&files, Some(&nvram)).unwrap();
        args.extend([
            "-drive".into(),
            format!("file={},format=raw,if=virtio", disk.display()),
        ]);
        Vm::start(label, &args)
    };

    let signed = run.path().join("signed.img");
    fs::copy(dir.join("disk.img"), &signed).unwrap();
    let mut vm = boot("secure-boot", &signed);
    vm.wait_api();
    let console = vm.console();
    says(
        &console,
        &[
            "keel-init: booted by UEFI, secure boot on",
            "keel-init: state on /dev/vda2 (persistent)",
        ],
    );
    assert!(
        !console.contains("not loaded"),
        "every module is signed and loads under lockdown: {console}"
    );
    vm.power_button_and_wait();

    let unsigned = run.path().join("unsigned.img");
    keel_firmware::disk::build(&keel_firmware::disk::DiskConfig {
        out: unsigned.clone(),
        loader: BootLoader::SystemdBoot,
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.img"),
        cmdline: report.cmdline.clone(),
        source_date_epoch: 1_700_000_000,
        state_mib: 0,
        digest: report.digest,
    })
    .unwrap();
    let mut vm = boot("secure-boot-unsigned", &unsigned);
    vm.0.wait_console("Access Denied", BOOT_TIMEOUT).unwrap();
    assert!(!vm.console().contains("keel-init"), "{}", vm.console());
}

/// The same disk boots on legacy BIOS (SeaBIOS → GRUB's boot sector →
/// GRUB's core image in the BIOS boot partition → the ESP's kernel).
#[test]
fn bios_boots_the_same_disk_image() {
    let (dir, _) = image();
    let run = tempfile::tempdir().unwrap();
    let disk = run.path().join("disk.img");
    fs::copy(dir.join("disk.img"), &disk).unwrap();
    let mut args = BootFirmware::Bios
        .qemu_args(&FirmwareFiles::default(), None)
        .unwrap();
    args.extend([
        "-drive".into(),
        format!("file={},format=raw,if=virtio", disk.display()),
    ]);
    let mut vm = Vm::start("bios-disk", &args);
    vm.wait_api();
    let console = vm.console();
    says(
        &console,
        &[
            "keel-init: booted by legacy BIOS",
            "keel-init: state on /dev/vda2 (persistent)",
        ],
    );
    vm.power_button_and_wait();
}

#[test]
fn appliance_joins_a_control_plane_outside_with_an_api_token() {
    let (dir, report) = image();
    // The control plane of a cloud of many hosts: PostgreSQL and an API
    // node on this machine. The appliance reaches this machine's loopback
    // as 10.0.2.2 through QEMU's user network, so hosts are told that
    // address for the database.
    let pg = PostgresServer::start().unwrap();
    let cp_dir = tempfile::tempdir().unwrap();
    let host_db = format!("postgres://postgres@10.0.2.2:{}/postgres", pg.port());
    let cp = KeelProcess::up_with(
        cp_dir.path(),
        &[
            "--database",
            &pg.url(),
            "--no-host-agent",
            "--host-database",
            &host_db,
        ],
    )
    .unwrap();
    let password = fs::read_to_string(cp_dir.path().join("admin-password")).unwrap();
    let login: serde_json::Value = ureq::post(&cp.url("/api/v1/auth/login"))
        .send_json(serde_json::json!({"username": "admin", "password": password.trim()}))
        .unwrap()
        .into_json()
        .unwrap();
    let bearer = format!("Bearer {}", login["access_token"].as_str().unwrap());
    let token: serde_json::Value = ureq::post(&cp.url("/api/v1/tokens"))
        .set("Authorization", &bearer)
        .send_json(serde_json::json!({"name": "appliance-join", "expires_in_days": 1}))
        .unwrap()
        .into_json()
        .unwrap();
    let port = cp.url("").rsplit(':').next().unwrap().to_owned();
    let cmdline = format!(
        "{} keel.join=http://10.0.2.2:{port} keel.token={} keel.hostname=appliance-1",
        report.cmdline,
        token["token"].as_str().unwrap()
    );
    let mut vm = Vm::start(
        "join",
        &[
            "-kernel".into(),
            dir.join("vmlinuz").display().to_string(),
            "-initrd".into(),
            dir.join("initramfs.img").display().to_string(),
            "-append".into(),
            cmdline,
        ],
    );
    vm.wait_api();
    let console = vm.console();
    assert!(
        console.contains(&format!(
            "keel-init: starting keel on 0.0.0.0:8080, joining the control plane at http://10.0.2.2:{port}"
        )),
        "{console}"
    );
    // The host registered outside, with the appliance's inventory, and
    // beats: it is schedulable.
    let mut host = serde_json::Value::Null;
    for _ in 0..240 {
        let hosts: serde_json::Value = ureq::get(&cp.url("/api/v1/hosts"))
            .set("Authorization", &bearer)
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if let Some(h) = hosts["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == "appliance-1" && h["responding"] == true)
        {
            host = h.clone();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(host["status"], "ENABLED", "{host}\n{}", vm.console());
    assert_eq!(host["cpu_arch"], "x86_64", "{host}");
    assert!(host["memory_bytes"].as_u64().unwrap() > 512 << 20, "{host}");
    assert!(
        host["nics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["driver"] == "virtio_net"),
        "{host}"
    );
    // Its own API serves the same cloud.
    let cloud: serde_json::Value = ureq::get(&cp.url("/api/v1/version"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(vm.instance_id(), cloud["instance_id"].as_str().unwrap());
    vm.power_button_and_wait();
}

/// Every line is on the console (which the failure shows).
fn says(console: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            console.contains(line),
            "no {line:?} on the console:\n{console}"
        );
    }
}

/// The library's VM with the accelerator the fixtures detected; test
/// failures panic with the console tail.
struct Vm(QemuVm);

impl Vm {
    fn start(label: &str, boot_args: &[String]) -> Vm {
        let accel = match Accel::detect().unwrap() {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        };
        Vm(QemuVm::start(label, &accel, boot_args).unwrap())
    }

    fn console(&self) -> String {
        self.0.console()
    }

    fn wait_api(&mut self) {
        self.0.wait_api(BOOT_TIMEOUT).unwrap();
    }

    fn instance_id(&self) -> String {
        let body: serde_json::Value = ureq::get(&self.0.url("/api/v1/version"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        body["instance_id"].as_str().unwrap().to_owned()
    }

    /// Presses the ACPI power button and waits for the guest to power off
    /// (acpid → poweroff → init stops keel).
    fn power_button_and_wait(&mut self) {
        self.0.power_button().unwrap();
        self.0.wait_exit(POWEROFF_TIMEOUT).unwrap();
        assert!(
            self.console().contains("keel-init: power button pressed"),
            "{}",
            self.console()
        );
    }
}

#[test]
fn init_restarts_keel_when_it_exits() {
    let (dir, report) = image();
    // An API address keel refuses: it exits at once, every time, and init
    // must keep restarting it (the same path a crash takes).
    let cmdline = format!("{} keel.listen=not-an-address", report.cmdline);
    let mut vm = Vm::start(
        "restart",
        &[
            "-kernel".into(),
            dir.join("vmlinuz").display().to_string(),
            "-initrd".into(),
            dir.join("initramfs.img").display().to_string(),
            "-append".into(),
            cmdline,
        ],
    );
    let restarted = "keel-init: keel exited; restarting in 1 s";
    vm.0.wait_console(restarted, BOOT_TIMEOUT).unwrap();
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    while vm.console().matches(restarted).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", vm.console());
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = vm.console();
    assert!(
        console.contains("not-an-address"),
        "keel's error is on the console: {console}"
    );
    vm.power_button_and_wait();
}
