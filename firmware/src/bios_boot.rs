//! Legacy-BIOS boot for the GPT disk image: GRUB's i386-pc boot sector in
//! the protective MBR loads GRUB's core image from a small BIOS boot
//! partition (GPT type EF02, in the gap before the ESP), whose embedded
//! configuration boots the ESP's kernel at once.
//!
//! GRUB rather than SYSLINUX: a chain whose second stage is read to 0x7c00
//! (where the MBR code just ran) does not boot under QEMU's TCG from a
//! vhost-user disk, because writes by the disk backend's process do not
//! invalidate TCG's translated code; GRUB's core loads to fresh pages.
//!
//! `grub-bios-setup` (which patches the boot sector and the core image's
//! block list) is in Debian's `grub-pc`, which also takes over the build
//! machine's boot loader, so the two patches it makes are written here, from
//! GRUB's `include/grub/i386/pc/boot.h` and `diskboot.S`.

use std::path::Path;
use std::process::Command;

use crate::disk::DiskError;

/// GRUB's i386-pc modules and boot sector (`grub-pc-bin`).
pub const GRUB_PC_DIR: &str = "/usr/lib/grub/i386-pc";
/// Bytes of boot code at the start of the MBR (the partition table follows).
pub const MBR_CODE_BYTES: usize = 440;
/// The core image's first sector (just after the primary GPT's entries).
pub const CORE_FIRST_SECTOR: u64 = 34;
/// Modules the core image carries: no `normal` mode, so there is no menu,
/// editor or shell to reach from the console, only the embedded script.
const MODULES: &[&str] = &["biosdisk", "part_gpt", "fat", "linux", "boot"];

/// Offsets in boot.img (`GRUB_BOOT_MACHINE_*`).
const KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE: usize = 0x64;
const DRIVE_CHECK: usize = 0x66;
/// The first block list sits at the end of the core image's first sector
/// (diskboot.img): start sector (u64), sector count (u16), segment (u16).
const BLOCKLIST: usize = 512 - 12;

/// GRUB's embedded script: the ESP (first partition of the boot disk) holds
/// the kernel and the initramfs.
pub fn embedded_cfg(cmdline: &str) -> String {
    format!(
        "set root=(hd0,gpt1)\nlinux /keel/vmlinuz {cmdline}\ninitrd /keel/initramfs.img\nboot\n"
    )
}

/// Builds GRUB's core image for `cmdline` with `grub-mkimage`.
pub fn core_image(stage: &Path, cmdline: &str) -> Result<Vec<u8>, DiskError> {
    let cfg = stage.join("grub-bios.cfg");
    let out = stage.join("core.img");
    std::fs::write(&cfg, embedded_cfg(cmdline)).map_err(|source| DiskError::Stage {
        path: cfg.clone(),
        source,
    })?;
    let mut cmd = Command::new("grub-mkimage");
    cmd.args([
        "-O",
        "i386-pc",
        "-d",
        GRUB_PC_DIR,
        "-p",
        "(hd0,gpt1)/",
        "-c",
    ])
    .arg(&cfg)
    .arg("-o")
    .arg(&out)
    .args(MODULES);
    let output = cmd.output().map_err(|source| DiskError::Spawn {
        cmd: "grub-mkimage".into(),
        package: "grub-common",
        source,
    })?;
    if !output.status.success() {
        return Err(DiskError::Tool {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    std::fs::read(&out).map_err(|source| DiskError::Stage { path: out, source })
}

/// Patches GRUB's boot sector to load the core image from
/// [`CORE_FIRST_SECTOR`] and the core image's block list to cover itself;
/// returns the MBR's boot code.
pub fn patch(boot_img: &[u8], core: &mut [u8]) -> Result<[u8; MBR_CODE_BYTES], DiskError> {
    let bad = |what: &str| DiskError::Tool {
        cmd: "grub boot images".into(),
        stderr: what.into(),
    };
    let mut code: [u8; MBR_CODE_BYTES] = boot_img
        .get(..MBR_CODE_BYTES)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("boot.img is shorter than 440 bytes"))?;
    code[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&CORE_FIRST_SECTOR.to_le_bytes());
    // 0xff: load from the drive the BIOS booted; and no check that would
    // replace a hard disk's drive number with 0x80.
    code[BOOT_DRIVE] = 0xff;
    code[DRIVE_CHECK..DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    let sectors = core.len().div_ceil(512);
    if sectors < 2 {
        return Err(bad("core.img is shorter than two sectors"));
    }
    let rest = u16::try_from(sectors - 1).map_err(|_| bad("core.img is too large"))?;
    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(CORE_FIRST_SECTOR + 1).to_le_bytes());
    core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&rest.to_le_bytes());
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_and_block_list_point_at_the_core_image() {
        let boot = vec![0u8; 512];
        let mut core = vec![0u8; 512 * 3 + 7];
        let code = patch(&boot, &mut core).unwrap();
        assert_eq!(&code[0x5c..0x64], &34u64.to_le_bytes());
        assert_eq!(code[0x64], 0xff);
        assert_eq!(&code[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(&core[500..508], &35u64.to_le_bytes());
        assert_eq!(
            &core[508..510],
            &3u16.to_le_bytes(),
            "4 sectors, 3 after the first"
        );
        assert!(patch(&boot[..100], &mut core).is_err());
        assert!(patch(&boot, &mut [0u8; 100]).is_err());
    }

    #[test]
    fn embedded_script_boots_the_esp_kernel() {
        let cfg = embedded_cfg("console=ttyS0 quiet");
        assert!(cfg.contains("linux /keel/vmlinuz console=ttyS0 quiet\n"));
        assert!(cfg.ends_with("boot\n"));
    }
}
