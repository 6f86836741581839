//! The bootable GPT disk image: an EFI system partition with a UEFI boot
//! loader (systemd-boot, or Debian's signed shim and GRUB for firmware with
//! secure boot on), the kernel and the initramfs, and an optional empty
//! ext4 `KEEL_STATE` partition the appliance mounts for its state. The same
//! disk boots on legacy BIOS: GRUB's boot sector in the protective MBR and
//! its core image in a BIOS boot partition boot the same kernel
//! ([`crate::bios_boot`]).
//!
//! The file systems are made by Debian's own tools (dosfstools, mtools,
//! e2fsprogs, gdisk) with every random or time-based field pinned: the
//! disk, partition and file-system GUIDs and the FAT volume id derive from
//! the image digest, timestamps come from `SOURCE_DATE_EPOCH`.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::bios_boot;

/// systemd-boot from Debian's `systemd-boot-efi`.
pub const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// shim from Debian's `shim-signed`, signed by Microsoft's UEFI CA (the
/// key firmware trusts out of the box); it trusts Debian's key.
pub const SHIM: &str = "/usr/lib/shim/shimx64.efi.signed";
/// shim's MOK manager, which shim starts when a key enrollment is pending.
pub const MOK_MANAGER: &str = "/usr/lib/shim/mmx64.efi.signed";
/// GRUB from Debian's `grub-efi-amd64-signed`, signed by Debian; under
/// secure boot it boots only kernels shim verifies (Debian's are signed).
pub const SIGNED_GRUB: &str = "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";
/// The ESP starts at this sector; the BIOS boot partition fills the gap
/// before it.
const ESP_FIRST_SECTOR: u64 = 2048;
/// Label the appliance's init looks for (`keel.state=` overrides).
pub const STATE_LABEL: &str = "KEEL_STATE";

const MIB: u64 = 1024 * 1024;
/// FAT stores local dates from 1980; an earlier `SOURCE_DATE_EPOCH` (0 is
/// the default) would wrap, so FAT and ext4 timestamps are clamped to
/// 1980-01-02 00:00 UTC.
const FAT_EPOCH_MIN: u64 = 315_619_200;

/// Why the disk image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("Cannot run {cmd} (install {package})")]
    Spawn {
        cmd: String,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Tool { cmd: String, stderr: String },
    #[error("Cannot read {path} (install {package})")]
    Missing {
        path: PathBuf,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot stage {path}")]
    Stage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write the disk image {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The UEFI boot loader on the ESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BootLoader {
    /// systemd-boot: small and simple, but unsigned, so firmware with secure
    /// boot on refuses it ("Access Denied").
    #[default]
    SystemdBoot,
    /// shim → GRUB → kernel, each signed by the key its predecessor trusts:
    /// boots with secure boot on (and off).
    SignedShimGrub,
}

impl BootLoader {
    /// The loader's files on the ESP; the kernel is `/keel/vmlinuz` and the
    /// initramfs `/keel/initramfs.img` for both.
    fn files(self, cmdline: &str) -> Result<Vec<(&'static str, Vec<u8>)>, DiskError> {
        Ok(match self {
            BootLoader::SystemdBoot => vec![
                (
                    "EFI/BOOT/BOOTX64.EFI",
                    read_from(SYSTEMD_BOOT, "systemd-boot-efi")?,
                ),
                ("loader/loader.conf", loader_conf().into_bytes()),
                (
                    "loader/entries/keel.conf",
                    loader_entry(cmdline).into_bytes(),
                ),
            ],
            // shim loads grubx64.efi from its own directory; GRUB reads
            // grub.cfg from its built-in prefix, /EFI/debian.
            BootLoader::SignedShimGrub => vec![
                ("EFI/BOOT/BOOTX64.EFI", read_from(SHIM, "shim-signed")?),
                ("EFI/BOOT/mmx64.efi", read_from(MOK_MANAGER, "shim-signed")?),
                (
                    "EFI/BOOT/grubx64.efi",
                    read_from(SIGNED_GRUB, "grub-efi-amd64-signed")?,
                ),
                ("EFI/debian/grub.cfg", grub_cfg(cmdline).into_bytes()),
            ],
        })
    }

    /// Directories the files go in, parents first.
    fn dirs(self) -> &'static [&'static str] {
        match self {
            BootLoader::SystemdBoot => &["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"],
            BootLoader::SignedShimGrub => &["::/EFI", "::/EFI/BOOT", "::/EFI/debian"],
        }
    }
}

/// Inputs of [`build`].
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub out: PathBuf,
    pub loader: BootLoader,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub source_date_epoch: u64,
    /// 0: no state partition.
    pub state_mib: u32,
    /// Identity of the image content; every GUID derives from it.
    pub digest: [u8; 32],
}

/// Partition layout in MiB: 1 MiB for the protective MBR and primary GPT,
/// then the ESP, the state partition, and 1 MiB for the backup GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub esp_mib: u64,
    pub state_mib: u64,
}

impl Layout {
    /// ESP sized for its content plus a quarter and 8 MiB of slack (kernel
    /// updates in place), at least 64 MiB so FAT never runs short of
    /// clusters.
    pub fn for_content(esp_bytes: u64, state_mib: u32) -> Layout {
        let need = esp_bytes + esp_bytes / 4 + 8 * MIB;
        Layout {
            esp_mib: need.div_ceil(MIB).max(64),
            state_mib: state_mib.into(),
        }
    }

    pub fn esp_offset(&self) -> u64 {
        MIB
    }

    pub fn state_offset(&self) -> u64 {
        MIB + self.esp_mib * MIB
    }

    pub fn total_bytes(&self) -> u64 {
        (1 + self.esp_mib + self.state_mib + 1) * MIB
    }
}

/// A GUID derived from the image digest and a purpose, with RFC 4122
/// version-4/variant bits so tools treat it as an ordinary random GUID.
pub fn derived_guid(digest: &[u8; 32], purpose: &str) -> String {
    let mut h = Sha256::new();
    h.update(digest);
    h.update(purpose.as_bytes());
    let b: [u8; 32] = h.finalize().into();
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[..16]);
    g[6] = (g[6] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    let x = crate::appliance::hex(&g);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// systemd-boot's `loader.conf`: boot the entry at once, and no editor, so
/// nobody at the console can change the kernel command line (`init=/bin/sh`).
pub fn loader_conf() -> String {
    "default keel.conf\ntimeout 0\neditor no\nconsole-mode keep\n".into()
}

/// The boot loader entry (Boot Loader Specification type 1).
pub fn loader_entry(cmdline: &str) -> String {
    format!(
        "title keel appliance\nlinux /keel/vmlinuz\ninitrd /keel/initramfs.img\noptions {cmdline}\n"
    )
}

/// GRUB's configuration: boot the one entry at once; a superuser without a
/// password means nobody at the console can edit the command line or get a
/// GRUB shell (the entry itself boots unrestricted).
pub fn grub_cfg(cmdline: &str) -> String {
    format!(
        "set superusers=\"keel\"\nset timeout=0\nmenuentry \"keel appliance\" --unrestricted {{\n\tlinux /keel/vmlinuz {cmdline}\n\tinitrd /keel/initramfs.img\n}}\n"
    )
}

/// Builds the disk image at `config.out`.
pub fn build(config: &DiskConfig) -> Result<u64, DiskError> {
    let stage = tempfile::tempdir().map_err(stage_err(Path::new("temporary directory")))?;
    let epoch = config.source_date_epoch.max(FAT_EPOCH_MIN);
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);

    // Files of the ESP, staged with the fixed mtime mcopy -m preserves.
    let mut files = config.loader.files(&config.cmdline)?;
    files.extend([
        ("keel/vmlinuz", read(&config.kernel)?),
        ("keel/initramfs.img", read(&config.initramfs)?),
    ]);
    let esp_bytes: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let layout = Layout::for_content(esp_bytes, config.state_mib);

    let esp = stage.path().join("esp.img");
    let volume_id = &derived_guid(&config.digest, "esp-volume-id")[..8];
    tool(
        Command::new("mkfs.vfat")
            .args(["--invariant", "-i", volume_id, "-n", "KEEL-ESP", "-C"])
            .arg(&esp)
            .arg((layout.esp_mib * 1024).to_string()),
        "dosfstools",
        epoch,
    )?;
    tool(
        Command::new("mmd")
            .arg("-i")
            .arg(&esp)
            .args(config.loader.dirs())
            .arg("::/keel"),
        "mtools",
        epoch,
    )?;
    for (i, (dest, data)) in files.iter().enumerate() {
        let src = stage.path().join(format!("f{i}"));
        let file = File::create(&src).map_err(stage_err(&src))?;
        (&file).write_all(data).map_err(stage_err(&src))?;
        file.set_modified(mtime).map_err(stage_err(&src))?;
        drop(file);
        tool(
            Command::new("mcopy")
                .args(["-m", "-i"])
                .arg(&esp)
                .arg(&src)
                .arg(format!("::/{dest}")),
            "mtools",
            epoch,
        )?;
    }

    let mut core = bios_boot::core_image(stage.path(), &config.cmdline)?;
    let boot_img = read_from(
        &format!("{}/boot.img", bios_boot::GRUB_PC_DIR),
        "grub-pc-bin",
    )?;
    let mbr_code = bios_boot::patch(&boot_img, &mut core)?;
    if bios_boot::CORE_FIRST_SECTOR + core.len().div_ceil(512) as u64 > ESP_FIRST_SECTOR {
        return Err(DiskError::Tool {
            cmd: "grub-mkimage".into(),
            stderr: format!(
                "the core image ({} bytes) does not fit before the ESP",
                core.len()
            ),
        });
    }

    let state = stage.path().join("state.img");
    if layout.state_mib > 0 {
        let uuid = derived_guid(&config.digest, "state-fs-uuid");
        let hash_seed = derived_guid(&config.digest, "state-fs-hash-seed");
        tool(
            Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-m", "0", "-L", STATE_LABEL, "-U"])
                .arg(&uuid)
                .arg("-E")
                .arg(format!("hash_seed={hash_seed},root_owner=0:0"))
                .arg(&state)
                .arg(format!("{}M", layout.state_mib)),
            "e2fsprogs",
            epoch,
        )?;
    }

    // The GPT goes on a zero-filled sparse file; the file systems are then
    // written at their offsets.
    let partial = config.out.with_extension("partial");
    let _ = fs::remove_file(&partial);
    let out = File::create(&partial).map_err(write_err(&partial))?;
    out.set_len(layout.total_bytes())
        .map_err(write_err(&partial))?;
    let mut sgdisk = Command::new("sgdisk");
    sgdisk
        .arg("-U")
        .arg(derived_guid(&config.digest, "disk"))
        .arg("-n")
        .arg(format!("1:{ESP_FIRST_SECTOR}:+{}M", layout.esp_mib))
        .args(["-t", "1:ef00", "-c", "1:KEEL-ESP", "-u"])
        .arg(format!(
            "1:{}",
            derived_guid(&config.digest, "esp-partition")
        ))
        // Partition 3, so the state partition stays the second.
        .args(["-a", "1", "-n"])
        .arg(format!(
            "3:{}:{}",
            bios_boot::CORE_FIRST_SECTOR,
            ESP_FIRST_SECTOR - 1
        ))
        .args(["-t", "3:ef02", "-c", "3:BIOS-BOOT", "-u"])
        .arg(format!(
            "3:{}",
            derived_guid(&config.digest, "bios-boot-partition")
        ));
    if layout.state_mib > 0 {
        sgdisk
            .arg("-n")
            .arg(format!("2:0:+{}M", layout.state_mib))
            .args(["-t", "2:8300", "-c", &format!("2:{STATE_LABEL}"), "-u"])
            .arg(format!(
                "2:{}",
                derived_guid(&config.digest, "state-partition")
            ));
    }
    tool(sgdisk.arg(&partial), "gdisk", epoch)?;
    (&out)
        .seek(SeekFrom::Start(0))
        .and_then(|_| (&out).write_all(&mbr_code))
        .and_then(|_| (&out).seek(SeekFrom::Start(bios_boot::CORE_FIRST_SECTOR * 512)))
        .and_then(|_| (&out).write_all(&core))
        .map_err(write_err(&partial))?;
    copy_at(&esp, &out, layout.esp_offset(), &partial)?;
    if layout.state_mib > 0 {
        copy_at(&state, &out, layout.state_offset(), &partial)?;
    }
    out.sync_all().map_err(write_err(&partial))?;
    drop(out);
    fs::rename(&partial, &config.out).map_err(write_err(&config.out))?;
    Ok(layout.total_bytes())
}

/// Copies `src` into `out` at `offset`, skipping all-zero blocks so the
/// image stays sparse on disk.
fn copy_at(src: &Path, mut out: &File, offset: u64, out_path: &Path) -> Result<(), DiskError> {
    const BLOCK: usize = 64 * 1024;
    let data = read(src)?;
    for (i, chunk) in data.chunks(BLOCK).enumerate() {
        if chunk.iter().all(|b| *b == 0) {
            continue;
        }
        out.seek(SeekFrom::Start(offset + (i * BLOCK) as u64))
            .and_then(|_| out.write_all(chunk))
            .map_err(write_err(out_path))?;
    }
    Ok(())
}

/// Runs a file-system tool with the clock pinned: mkfs.fat and mtools read
/// `SOURCE_DATE_EPOCH`, mke2fs `E2FSPROGS_FAKE_TIME`; UTC so FAT's local
/// dates do not depend on the build machine's zone.
fn tool(cmd: &mut Command, package: &'static str, epoch: u64) -> Result<(), DiskError> {
    cmd.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1");
    let name = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| DiskError::Spawn {
        cmd: name.clone(),
        package,
        source,
    })?;
    if !out.status.success() {
        return Err(DiskError::Tool {
            cmd: name,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, DiskError> {
    fs::read(path).map_err(stage_err(path))
}

/// A boot loader file a Debian package installs.
fn read_from(path: &str, package: &'static str) -> Result<Vec<u8>, DiskError> {
    fs::read(path).map_err(|source| DiskError::Missing {
        path: path.into(),
        package,
        source,
    })
}

fn stage_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_owned();
    move |source| DiskError::Stage { path, source }
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_owned();
    move |source| DiskError::Write { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stable_distinct_and_well_formed() {
        let a = derived_guid(&[1; 32], "disk");
        assert_eq!(a, derived_guid(&[1; 32], "disk"));
        assert_ne!(a, derived_guid(&[1; 32], "esp-partition"));
        assert_ne!(a, derived_guid(&[2; 32], "disk"));
        let parts: Vec<_> = a.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&a[14..15], "4", "version nibble: {a}");
        assert!("89ab".contains(&a[19..20]), "variant: {a}");
    }

    #[test]
    fn layout_leaves_room_and_aligns_to_mib() {
        let l = Layout::for_content(30 * MIB, 64);
        assert_eq!(l.esp_mib, 64);
        assert_eq!(l.esp_offset(), MIB);
        assert_eq!(l.state_offset(), 65 * MIB);
        assert_eq!(l.total_bytes(), 130 * MIB);
        let big = Layout::for_content(100 * MIB, 0);
        assert_eq!(big.esp_mib, 133);
        assert_eq!(big.total_bytes(), 135 * MIB);
    }

    #[test]
    fn loader_entry_has_no_editor_and_boots_at_once() {
        assert!(loader_conf().contains("editor no\n"));
        assert!(loader_conf().contains("timeout 0\n"));
        let e = loader_entry("console=ttyS0 quiet");
        assert!(e.contains("linux /keel/vmlinuz\n"));
        assert!(e.contains("options console=ttyS0 quiet\n"));
    }

    #[test]
    fn grub_boots_at_once_and_locks_the_console() {
        let cfg = grub_cfg("console=ttyS0 quiet");
        assert!(cfg.starts_with("set superusers=\"keel\"\n"), "{cfg}");
        assert!(!cfg.contains("password"), "no one can log in: {cfg}");
        assert!(cfg.contains("set timeout=0\n"));
        assert!(cfg.contains("--unrestricted {"));
        assert!(cfg.contains("\tlinux /keel/vmlinuz console=ttyS0 quiet\n"));
        assert!(cfg.contains("\tinitrd /keel/initramfs.img\n"));
    }
}
