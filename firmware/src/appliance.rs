//! The appliance's kernel + initramfs pair and its iPXE script.
//!
//! The initramfs is the whole root file system: busybox (init, shell,
//! udhcpc, acpid), iproute2, the stripped `keel` binary, the shared
//! libraries those need (found with `ldd`), the kernel modules for virtio,
//! common server NICs and disks and ext4, and the scripts in
//! `firmware/rootfs/`. It is built as a [`CpioTree`] (sorted, root-owned,
//! one mtime) and compressed with zstd at a fixed level in one thread, so
//! the same inputs give the same bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cpio::{CpioError, CpioTree, Node};
use crate::kernel::{module_name, Kernel, KernelError};

/// Kernel modules in the image (plus their dependencies). Virtio for VMs
/// and tests; the NIC and disk drivers of common servers; ext4 for the
/// state partition (after crc32c); button + evdev so acpid sees the power button; vfio-pci
/// and tun for the data planes.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "nvme",
    "ahci",
    "sd_mod",
    // ext4's soft dependency (modules.softdep: "pre: crypto-crc32c"), which
    // modules.dep does not list: without it the state partition won't mount.
    "crc32c_intel",
    "crc32c_generic",
    "ext4",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "mlx5_core",
    "bnxt_en",
    "button",
    "evdev",
    "vfio_pci",
    "tun",
];

/// Kernel command line of both boot paths: the serial console last so it
/// becomes `/dev/console` (keel's log), a reboot 10 s after a panic.
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200n8 panic=10 quiet loglevel=4";

/// zstd level: 19 is the highest non-"ultra" level; the kernel decompresses
/// it as fast as any other level.
const ZSTD_LEVEL: i32 = 19;
/// Tools rc.sysinit grows the state partition with (Debian's `fdisk` and
/// `e2fsprogs`), with their libraries.
const GROW_TOOLS: [(&str, &str); 2] = [
    ("/sbin/sfdisk", "sbin/sfdisk"),
    ("/sbin/resize2fs", "sbin/resize2fs"),
];

const INITTAB: &str = include_str!("../rootfs/inittab");
const RC_SYSINIT: &str = include_str!("../rootfs/rc.sysinit");
const RC_SHUTDOWN: &str = include_str!("../rootfs/rc.shutdown");
const RUN_KEEL: &str = include_str!("../rootfs/run-keel");
const UDHCPC_SCRIPT: &str = include_str!("../rootfs/udhcpc.script");
const ACPI_POWER: &str = include_str!("../rootfs/acpi-power");

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("Kernel")]
    Kernel(#[from] KernelError),
    #[error("Initramfs archive")]
    Archive(#[from] CpioError),
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot run {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Tool { cmd: String, stderr: String },
    #[error("SOURCE_DATE_EPOCH={0:?} is not a number of seconds")]
    SourceDateEpoch(String),
    #[error("Cannot compress the initramfs")]
    Compress(#[source] std::io::Error),
    #[error("Disk image")]
    Disk(#[from] crate::disk::DiskError),
}

/// What goes into an image; [`ImageConfig::new`] fills in this machine's
/// Debian packages.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub out_dir: PathBuf,
    /// The `keel` binary to ship (stripped on the way in).
    pub keel_bin: PathBuf,
    pub kernel: Kernel,
    /// busybox-static's `/bin/busybox`.
    pub busybox: PathBuf,
    /// iproute2's `ip`; `None` leaves busybox's `ip` applet.
    pub iproute2: Option<PathBuf>,
    /// Also ship `qemu-system-x86_64`, its libraries and firmware.
    pub with_qemu: bool,
    /// Timestamp of every file in the image (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: u64,
    /// Kernel command line of the iPXE script and the disk's boot entry.
    pub cmdline: String,
    /// Also build the UEFI disk image.
    pub disk: bool,
    /// Its boot loader: the signed shim + GRUB by default, so hosts with
    /// secure boot on boot it.
    pub loader: crate::disk::BootLoader,
    /// Size of the empty ext4 `KEEL_STATE` partition on the disk image;
    /// 0 leaves it out.
    pub state_mib: u32,
}

impl ImageConfig {
    /// This machine's kernel, busybox and iproute2; `SOURCE_DATE_EPOCH`
    /// from the environment (0 when unset).
    pub fn new(out_dir: &Path, keel_bin: &Path) -> Result<ImageConfig, ImageError> {
        let iproute2 = ["/usr/bin/ip", "/bin/ip", "/sbin/ip"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        Ok(ImageConfig {
            out_dir: out_dir.to_owned(),
            keel_bin: keel_bin.to_owned(),
            kernel: Kernel::newest_installed()?,
            busybox: PathBuf::from("/bin/busybox"),
            iproute2,
            with_qemu: false,
            source_date_epoch: source_date_epoch()?,
            cmdline: DEFAULT_CMDLINE.into(),
            disk: true,
            loader: crate::disk::BootLoader::SignedShimGrub,
            state_mib: 64,
        })
    }
}

impl ImageConfig {
    /// A key that changes whenever a rebuild could give different bytes:
    /// the recipe (scripts, modules, command line, this crate's version),
    /// the settings, and size + mtime of every input file. For caching
    /// built images (CI, tests); the image itself never depends on mtimes.
    pub fn cache_key(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            env!("CARGO_PKG_VERSION"),
            INITTAB,
            RC_SYSINIT,
            RC_SHUTDOWN,
            RUN_KEEL,
            UDHCPC_SCRIPT,
            ACPI_POWER,
            &MODULES.join(","),
            &self.cmdline,
            &self.kernel.version,
            &format!(
                "{} {} {} {} {} {:?}",
                self.with_qemu,
                self.source_date_epoch,
                self.disk,
                self.state_mib,
                ZSTD_LEVEL,
                self.loader
            ),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let grow_tools: Vec<PathBuf> = GROW_TOOLS.iter().map(|(src, _)| src.into()).collect();
        let files = [
            Some(&self.keel_bin),
            Some(&self.kernel.image),
            Some(&self.busybox),
        ];
        for path in files
            .into_iter()
            .chain([self.iproute2.as_ref()])
            .flatten()
            .chain(&grow_tools)
        {
            let meta = fs::metadata(path).ok();
            let stamp = meta.as_ref().map(|m| {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                format!("{} {} {}", m.len(), mtime.as_secs(), mtime.subsec_nanos())
            });
            h.update(format!("{}={stamp:?}", path.display()).as_bytes());
            h.update([0]);
        }
        hex(&h.finalize()[..12])
    }
}

/// `SOURCE_DATE_EPOCH` from the environment, 0 when unset.
pub fn source_date_epoch() -> Result<u64, ImageError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(_) => Ok(0),
        Ok(s) => s.trim().parse().map_err(|_| ImageError::SourceDateEpoch(s)),
    }
}

/// One output file and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub path: PathBuf,
    pub bytes: u64,
}

/// What [`build`] wrote.
#[derive(Debug, Clone)]
pub struct ImageReport {
    pub kernel: Artifact,
    pub initramfs: Artifact,
    pub ipxe: Artifact,
    pub disk: Option<Artifact>,
    /// Uncompressed size of the initramfs' files.
    pub rootfs_bytes: u64,
    pub kernel_version: String,
    pub cmdline: String,
    /// SHA-256 of kernel + initramfs + command line: the image's identity,
    /// from which the disk's GUIDs derive.
    pub digest: [u8; 32],
}

impl std::fmt::Display for ImageReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(f, "keel appliance image (kernel {})", self.kernel_version)?;
        let mut rows = vec![&self.kernel, &self.initramfs, &self.ipxe];
        rows.extend(self.disk.as_ref());
        for a in rows {
            writeln!(
                f,
                "  {:<40} {:>12} bytes {:>9.1} MiB",
                a.path.display(),
                a.bytes,
                mib(a.bytes)
            )?;
        }
        writeln!(
            f,
            "  root file system: {:.1} MiB uncompressed",
            mib(self.rootfs_bytes)
        )?;
        write!(f, "  sha256: {}", hex(&self.digest))
    }
}

/// Builds `vmlinuz`, `initramfs.img`, `keel.ipxe` (and `disk.img`) in
/// `config.out_dir`.
pub fn build(config: &ImageConfig) -> Result<ImageReport, ImageError> {
    fs::create_dir_all(&config.out_dir).map_err(write_err(&config.out_dir))?;
    let tree = rootfs(config)?;
    let mtime = u32::try_from(config.source_date_epoch).unwrap_or(u32::MAX);
    let cpio = tree.write(mtime)?;
    let initramfs = zstd::bulk::compress(&cpio, ZSTD_LEVEL).map_err(ImageError::Compress)?;
    let kernel = fs::read(&config.kernel.image).map_err(read_err(&config.kernel.image))?;

    let mut hash = Sha256::new();
    hash.update(&kernel);
    hash.update(&initramfs);
    hash.update(config.cmdline.as_bytes());
    let digest: [u8; 32] = hash.finalize().into();

    let out = &config.out_dir;
    let kernel = write_artifact(&out.join("vmlinuz"), &kernel)?;
    let initramfs = write_artifact(&out.join("initramfs.img"), &initramfs)?;
    let ipxe = write_artifact(
        &out.join("keel.ipxe"),
        ipxe_script(&config.kernel.version, &config.cmdline, &digest).as_bytes(),
    )?;
    let disk = if config.disk {
        let path = out.join("disk.img");
        crate::disk::build(&crate::disk::DiskConfig {
            out: path.clone(),
            loader: config.loader,
            kernel: kernel.path.clone(),
            initramfs: initramfs.path.clone(),
            cmdline: config.cmdline.clone(),
            source_date_epoch: config.source_date_epoch,
            state_mib: config.state_mib,
            digest,
        })?;
        Some(artifact(&path)?)
    } else {
        None
    };
    Ok(ImageReport {
        kernel,
        initramfs,
        ipxe,
        disk,
        rootfs_bytes: tree.content_bytes(),
        kernel_version: config.kernel.version.clone(),
        cmdline: config.cmdline.clone(),
        digest,
    })
}

/// [`build`], unless `config.out_dir` already holds a complete build with
/// the same [`ImageConfig::cache_key`]; then its files are reused.
pub fn build_cached(config: &ImageConfig) -> Result<ImageReport, ImageError> {
    let stamp = config.out_dir.join("cache-key");
    let key = config.cache_key();
    if let Ok(text) = fs::read_to_string(&stamp) {
        if let Some(rootfs_bytes) = text
            .strip_prefix(&format!("{key} "))
            .and_then(|n| n.trim().parse().ok())
        {
            if let Ok(report) = report_of(config, rootfs_bytes) {
                return Ok(report);
            }
        }
    }
    let _ = fs::remove_file(&stamp);
    let report = build(config)?;
    fs::write(&stamp, format!("{key} {}\n", report.rootfs_bytes)).map_err(write_err(&stamp))?;
    Ok(report)
}

/// The report of a finished build in `config.out_dir`.
fn report_of(config: &ImageConfig, rootfs_bytes: u64) -> Result<ImageReport, ImageError> {
    let out = &config.out_dir;
    let kernel = artifact(&out.join("vmlinuz"))?;
    let initramfs = artifact(&out.join("initramfs.img"))?;
    let mut hash = Sha256::new();
    hash.update(read(&kernel.path)?);
    hash.update(read(&initramfs.path)?);
    hash.update(config.cmdline.as_bytes());
    Ok(ImageReport {
        kernel,
        initramfs,
        ipxe: artifact(&out.join("keel.ipxe"))?,
        disk: if config.disk {
            Some(artifact(&out.join("disk.img"))?)
        } else {
            None
        },
        rootfs_bytes,
        kernel_version: config.kernel.version.clone(),
        cmdline: config.cmdline.clone(),
        digest: hash.finalize().into(),
    })
}

/// The iPXE script: kernel and initrd relative to the script's own URL, so
/// the three files can be served from any HTTP/TFTP directory together.
pub fn ipxe_script(kernel_version: &str, cmdline: &str, digest: &[u8; 32]) -> String {
    format!(
        "#!ipxe\n\
         # keel appliance, kernel {kernel_version}, image sha256 {}\n\
         # Extra kernel options (keel.ip=, keel.gw=, hugepages=, ...) go in ${{keel-args}}.\n\
         kernel vmlinuz initrd=initramfs.img {cmdline} ${{keel-args}}\n\
         initrd initramfs.img\n\
         boot\n",
        hex(digest)
    )
}

/// The root file system of the appliance.
pub fn rootfs(config: &ImageConfig) -> Result<CpioTree, ImageError> {
    let mut tree = CpioTree::new();
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "var/lib/keel",
        "dev/hugepages",
    ] {
        tree.dir(d);
    }
    tree.insert("dev/console", Node::CharDevice { major: 5, minor: 1 });

    // busybox and a link per applet (its own list, so nothing is guessed).
    tree.file("bin/busybox", 0o755, read(&config.busybox)?);
    let applets = run_tool(Command::new(&config.busybox).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&applets).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "bin/busybox" && applet != "linuxrc" {
            tree.symlink(applet, "/bin/busybox");
        }
    }
    tree.symlink("init", "/sbin/init");

    if let Some(ip) = &config.iproute2 {
        add_elf(&mut tree, ip, "sbin/ip", false)?;
    }
    // Growing the state partition to its disk (rc.sysinit).
    for (src, dest) in GROW_TOOLS {
        add_elf(&mut tree, Path::new(src), dest, false)?;
    }
    add_elf(&mut tree, &config.keel_bin, "usr/bin/keel", true)?;
    if config.with_qemu {
        add_qemu(&mut tree)?;
    }

    let order = config.kernel.resolve_modules(MODULES)?;
    let mut list = String::new();
    for module in &order {
        let name = format!("{}.ko", module_name(module));
        tree.file(
            &format!("lib/modules/{name}"),
            0o644,
            config.kernel.read_module(module)?,
        );
        list.push_str(&name);
        list.push('\n');
    }
    tree.file("etc/keel/modules", 0o644, list.into_bytes());

    tree.file("etc/inittab", 0o644, INITTAB.into());
    tree.file("etc/keel/rc.sysinit", 0o755, RC_SYSINIT.into());
    tree.file("etc/keel/rc.shutdown", 0o755, RC_SHUTDOWN.into());
    tree.file("etc/keel/run-keel", 0o755, RUN_KEEL.into());
    tree.file("etc/keel/udhcpc.script", 0o755, UDHCPC_SCRIPT.into());
    tree.file("etc/acpi/PWRF/00000080", 0o755, ACPI_POWER.into());
    tree.file(
        "etc/keel/release",
        0o644,
        format!(
            "{} kernel {}\n",
            env!("CARGO_PKG_VERSION"),
            config.kernel.version
        )
        .into(),
    );
    tree.file("etc/hostname", 0o644, b"keel\n".to_vec());
    tree.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/sbin/nologin\n".to_vec(),
    );
    tree.file("etc/group", 0o644, b"root:x:0:\n".to_vec());
    // Locked: no password login exists, even if a getty were started.
    tree.file("etc/shadow", 0o600, b"root:!:1::::::\n".to_vec());
    tree.symlink("etc/mtab", "/proc/mounts");
    tree.symlink("etc/resolv.conf", "/run/resolv.conf");
    Ok(tree)
}

/// Adds an ELF executable and every shared library it loads, at the paths
/// the dynamic loader will look for them.
fn add_elf(tree: &mut CpioTree, src: &Path, dest: &str, strip: bool) -> Result<(), ImageError> {
    let data = if strip { stripped(src)? } else { read(src)? };
    tree.file(dest, 0o755, data);
    let ldd = run_tool(Command::new("ldd").arg(src))?;
    for lib in parse_ldd(&String::from_utf8_lossy(&ldd)) {
        if !tree.contains(&lib) {
            // fs::read follows the symlink to the versioned file.
            let data = read(Path::new(&lib))?;
            tree.file(&lib, 0o755, data);
        }
    }
    Ok(())
}

/// QEMU for the host's VMs: the emulator, its libraries and its firmware
/// blobs (symlinks into other packages resolved to files).
fn add_qemu(tree: &mut CpioTree) -> Result<(), ImageError> {
    add_elf(
        tree,
        Path::new("/usr/bin/qemu-system-x86_64"),
        "usr/bin/qemu-system-x86_64",
        false,
    )?;
    for dir in ["/usr/share/qemu", "/usr/share/seabios", "/usr/share/OVMF"] {
        let mut stack = vec![PathBuf::from(dir)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.exists() {
                    let rel = path.to_string_lossy().trim_start_matches('/').to_owned();
                    tree.file(&rel, 0o644, read(&path)?);
                }
            }
        }
    }
    Ok(())
}

/// Library paths from `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x..)`
/// and the loader line `/lib64/ld-linux-x86-64.so.2 (0x..)`; the vDSO has
/// no file. Sorted, each once.
pub fn parse_ldd(output: &str) -> Vec<String> {
    let mut libs: Vec<String> = output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// `objcopy --strip-all` into a temporary file: the debug build of keel is
/// ~100 MB, mostly DWARF.
fn stripped(src: &Path) -> Result<Vec<u8>, ImageError> {
    let tmp = tempfile::NamedTempFile::new().map_err(write_err(Path::new("temporary file")))?;
    run_tool(
        Command::new("objcopy")
            .arg("--strip-all")
            .arg(src)
            .arg(tmp.path()),
    )?;
    read(tmp.path())
}

pub(crate) fn run_tool(cmd: &mut Command) -> Result<Vec<u8>, ImageError> {
    let name = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        cmd: name.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            cmd: name,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    fs::read(path).map_err(read_err(path))
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Read { path, source }
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Write { path, source }
}

/// Writes via a temporary name and renames, so a reader never sees half a file.
fn write_artifact(path: &Path, data: &[u8]) -> Result<Artifact, ImageError> {
    let partial = path.with_extension("partial");
    fs::write(&partial, data).map_err(write_err(&partial))?;
    fs::rename(&partial, path).map_err(write_err(path))?;
    artifact(path)
}

fn artifact(path: &Path) -> Result<Artifact, ImageError> {
    let bytes = fs::metadata(path).map_err(read_err(path))?.len();
    Ok(Artifact {
        path: path.to_owned(),
        bytes,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_files_only() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2",
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }

    #[test]
    fn ipxe_script_boots_the_pair_next_to_it() {
        let s = ipxe_script("6.1.0-1-amd64", DEFAULT_CMDLINE, &[0xab; 32]);
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains(&format!(
            "\nkernel vmlinuz initrd=initramfs.img {DEFAULT_CMDLINE} ${{keel-args}}\n"
        )));
        assert!(s.contains("\ninitrd initramfs.img\nboot\n"));
        assert!(s.contains(&"ab".repeat(32)));
    }

    #[test]
    fn source_date_epoch_must_be_a_number() {
        // Only this test touches the variable in this test binary.
        std::env::set_var("SOURCE_DATE_EPOCH", "1700000000");
        assert_eq!(source_date_epoch().unwrap(), 1_700_000_000);
        std::env::set_var("SOURCE_DATE_EPOCH", "yesterday");
        assert!(source_date_epoch().is_err());
        std::env::remove_var("SOURCE_DATE_EPOCH");
        assert_eq!(source_date_epoch().unwrap(), 0);
    }
}
