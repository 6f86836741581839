//! The UEFI-bootable GPT disk image: an EFI system partition with
//! systemd-boot, the kernel and the initramfs, and an optional empty ext4
//! `KEEL_STATE` partition the appliance mounts for its state.
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

/// systemd-boot from Debian's `systemd-boot-efi`.
pub const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
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

/// Inputs of [`build`].
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub out: PathBuf,
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

/// Builds the disk image at `config.out`.
pub fn build(config: &DiskConfig) -> Result<u64, DiskError> {
    let stage = tempfile::tempdir().map_err(stage_err(Path::new("temporary directory")))?;
    let epoch = config.source_date_epoch.max(FAT_EPOCH_MIN);
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);

    // Files of the ESP, staged with the fixed mtime mcopy -m preserves.
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("EFI/BOOT/BOOTX64.EFI", read(Path::new(SYSTEMD_BOOT))?),
        ("loader/loader.conf", loader_conf().into_bytes()),
        (
            "loader/entries/keel.conf",
            loader_entry(&config.cmdline).into_bytes(),
        ),
        ("keel/vmlinuz", read(&config.kernel)?),
        ("keel/initramfs.img", read(&config.initramfs)?),
    ];
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
        Command::new("mmd").arg("-i").arg(&esp).args([
            "::/EFI",
            "::/EFI/BOOT",
            "::/loader",
            "::/loader/entries",
            "::/keel",
        ]),
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
        .arg(format!("1:2048:+{}M", layout.esp_mib))
        .args(["-t", "1:ef00", "-c", "1:KEEL-ESP", "-u"])
        .arg(format!(
            "1:{}",
            derived_guid(&config.digest, "esp-partition")
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
}
