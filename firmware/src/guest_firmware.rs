//! Boot firmware for guests: an image's firmware attribute (BIOS, or UEFI
//! with secure boot on or off) picks SeaBIOS or OVMF from Debian's
//! `seabios` and `ovmf` packages, and a UEFI VM gets its own NVRAM vars
//! file, created once from the matching template and then kept with the VM
//! (it is VM state: boot entries, secure-boot keys, so snapshots, clones and
//! backups must carry it).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Name of the NVRAM file in a VM's directory.
pub const NVRAM_FILE: &str = "nvram.fd";

/// The firmware a guest boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootFirmware {
    /// Legacy BIOS: SeaBIOS.
    Bios,
    /// UEFI: OVMF; with `secure_boot`, the SMM build with Microsoft's keys
    /// enrolled, so only signed loaders (shim, Windows) boot.
    Uefi { secure_boot: bool },
}

/// Why a firmware attribute or NVRAM file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("Unknown boot firmware {0:?} (bios, uefi or uefi-secure)")]
    Parse(String),
    #[error("Firmware file {path} is missing (install {package})")]
    Missing {
        path: PathBuf,
        package: &'static str,
    },
    #[error("Cannot create the NVRAM file {path}")]
    CreateNvram {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FromStr for BootFirmware {
    type Err = FirmwareError;
    /// `bios`, `uefi`, `uefi-secure`: the image attribute's wire form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bios" => Ok(BootFirmware::Bios),
            "uefi" => Ok(BootFirmware::Uefi { secure_boot: false }),
            "uefi-secure" => Ok(BootFirmware::Uefi { secure_boot: true }),
            other => Err(FirmwareError::Parse(other.into())),
        }
    }
}

impl std::fmt::Display for BootFirmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootFirmware::Bios => "bios",
            BootFirmware::Uefi { secure_boot: false } => "uefi",
            BootFirmware::Uefi { secure_boot: true } => "uefi-secure",
        })
    }
}

/// Where Debian's packages put the firmware files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFiles {
    pub seabios: PathBuf,
    pub ovmf_code: PathBuf,
    pub ovmf_vars: PathBuf,
    pub ovmf_code_secboot: PathBuf,
    /// Vars with Microsoft's KEK/db enrolled and secure boot enforced.
    pub ovmf_vars_secboot: PathBuf,
}

impl Default for FirmwareFiles {
    /// Debian 12: `seabios` and `ovmf` (the 2 MiB flash layout, whose code
    /// and vars files pair up; the `_4M` variants are a different layout).
    fn default() -> Self {
        FirmwareFiles {
            seabios: "/usr/share/seabios/bios-256k.bin".into(),
            ovmf_code: "/usr/share/OVMF/OVMF_CODE.fd".into(),
            ovmf_vars: "/usr/share/OVMF/OVMF_VARS.fd".into(),
            ovmf_code_secboot: "/usr/share/OVMF/OVMF_CODE.secboot.fd".into(),
            ovmf_vars_secboot: "/usr/share/OVMF/OVMF_VARS.ms.fd".into(),
        }
    }
}

impl BootFirmware {
    /// The read-only firmware image.
    pub fn code<'a>(&self, files: &'a FirmwareFiles) -> &'a Path {
        match self {
            BootFirmware::Bios => &files.seabios,
            BootFirmware::Uefi { secure_boot: false } => &files.ovmf_code,
            BootFirmware::Uefi { secure_boot: true } => &files.ovmf_code_secboot,
        }
    }

    /// The template a VM's NVRAM is created from; BIOS has none.
    pub fn vars_template<'a>(&self, files: &'a FirmwareFiles) -> Option<&'a Path> {
        match self {
            BootFirmware::Bios => None,
            BootFirmware::Uefi { secure_boot: false } => Some(&files.ovmf_vars),
            BootFirmware::Uefi { secure_boot: true } => Some(&files.ovmf_vars_secboot),
        }
    }

    /// The VM's NVRAM file in `vm_dir`, created from the template on the
    /// first call and never overwritten afterwards (the guest changed it).
    /// `None` for BIOS.
    pub fn ensure_nvram(
        &self,
        files: &FirmwareFiles,
        vm_dir: &Path,
    ) -> Result<Option<PathBuf>, FirmwareError> {
        let Some(template) = self.vars_template(files) else {
            return Ok(None);
        };
        let path = vm_dir.join(NVRAM_FILE);
        if path.exists() {
            return Ok(Some(path));
        }
        let data = fs::read(template).map_err(|_| FirmwareError::Missing {
            path: template.to_owned(),
            package: "ovmf",
        })?;
        let create_err = |source| FirmwareError::CreateNvram {
            path: path.clone(),
            source,
        };
        // Written under a temporary name and renamed: a crash never leaves
        // a truncated NVRAM that would look like an existing one.
        let partial = vm_dir.join(format!("{NVRAM_FILE}.partial"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(create_err)?;
        file.write_all(&data).map_err(create_err)?;
        file.sync_all().map_err(create_err)?;
        fs::rename(&partial, &path).map_err(create_err)?;
        Ok(Some(path))
    }

    /// QEMU arguments selecting this firmware for a q35 machine (put them
    /// after `-machine q35`; secure boot needs SMM and a flash only SMM code
    /// may write, or the guest could rewrite its own keys).
    pub fn qemu_args(
        &self,
        files: &FirmwareFiles,
        nvram: Option<&Path>,
    ) -> Result<Vec<String>, FirmwareError> {
        let code = self.code(files);
        if !code.exists() {
            return Err(FirmwareError::Missing {
                path: code.to_owned(),
                package: match self {
                    BootFirmware::Bios => "seabios",
                    BootFirmware::Uefi { .. } => "ovmf",
                },
            });
        }
        let mut args = Vec::new();
        match self {
            BootFirmware::Bios => {
                args.extend(["-bios".into(), code.display().to_string()]);
            }
            BootFirmware::Uefi { secure_boot } => {
                if *secure_boot {
                    // OVMF's SMM build hangs before printing anything when
                    // the machine offers S3 (seen under TCG with QEMU 7.2).
                    args.extend([
                        "-machine".into(),
                        "smm=on".into(),
                        "-global".into(),
                        "driver=cfi.pflash01,property=secure,value=on".into(),
                        "-global".into(),
                        "ICH9-LPC.disable_s3=1".into(),
                    ]);
                }
                args.extend([
                    "-drive".into(),
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        code.display()
                    ),
                ]);
                if let Some(nvram) = nvram {
                    args.extend([
                        "-drive".into(),
                        format!("if=pflash,format=raw,unit=1,file={}", nvram.display()),
                    ]);
                }
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_files(dir: &Path) -> FirmwareFiles {
        let files = FirmwareFiles {
            seabios: dir.join("bios.bin"),
            ovmf_code: dir.join("code.fd"),
            ovmf_vars: dir.join("vars.fd"),
            ovmf_code_secboot: dir.join("code.secboot.fd"),
            ovmf_vars_secboot: dir.join("vars.ms.fd"),
        };
        for (path, data) in [
            (&files.seabios, &b"bios"[..]),
            (&files.ovmf_code, b"code"),
            (&files.ovmf_vars, b"vars"),
            (&files.ovmf_code_secboot, b"code-sb"),
            (&files.ovmf_vars_secboot, b"vars-ms"),
        ] {
            fs::write(path, data).unwrap();
        }
        files
    }

    #[test]
    fn attribute_round_trips_and_rejects_unknown() {
        for s in ["bios", "uefi", "uefi-secure"] {
            assert_eq!(s.parse::<BootFirmware>().unwrap().to_string(), s);
        }
        assert!("efi".parse::<BootFirmware>().is_err());
        assert!("".parse::<BootFirmware>().is_err());
    }

    #[test]
    fn secure_boot_picks_the_smm_build_and_microsoft_keys() {
        let f = FirmwareFiles::default();
        let sb = BootFirmware::Uefi { secure_boot: true };
        assert_eq!(
            sb.code(&f),
            Path::new("/usr/share/OVMF/OVMF_CODE.secboot.fd")
        );
        assert_eq!(
            sb.vars_template(&f).unwrap(),
            Path::new("/usr/share/OVMF/OVMF_VARS.ms.fd")
        );
        let plain = BootFirmware::Uefi { secure_boot: false };
        assert_eq!(plain.code(&f), Path::new("/usr/share/OVMF/OVMF_CODE.fd"));
        assert_eq!(BootFirmware::Bios.vars_template(&f), None);
    }

    #[test]
    fn nvram_is_created_from_the_template_once_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = fake_files(dir.path());
        let vm = dir.path().join("vm");
        fs::create_dir(&vm).unwrap();
        let uefi = BootFirmware::Uefi { secure_boot: true };
        let nvram = uefi.ensure_nvram(&files, &vm).unwrap().unwrap();
        assert_eq!(fs::read(&nvram).unwrap(), b"vars-ms");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&nvram).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The guest writes its boot entries; a restart must not reset them.
        fs::write(&nvram, b"guest-changed").unwrap();
        assert_eq!(uefi.ensure_nvram(&files, &vm).unwrap().unwrap(), nvram);
        assert_eq!(fs::read(&nvram).unwrap(), b"guest-changed");
        assert_eq!(BootFirmware::Bios.ensure_nvram(&files, &vm).unwrap(), None);
    }

    #[test]
    fn missing_template_is_reported_with_its_package() {
        let dir = tempfile::tempdir().unwrap();
        let files = FirmwareFiles {
            ovmf_vars: dir.path().join("absent.fd"),
            ..fake_files(dir.path())
        };
        let err = BootFirmware::Uefi { secure_boot: false }
            .ensure_nvram(&files, dir.path())
            .unwrap_err();
        assert!(matches!(
            err,
            FirmwareError::Missing {
                package: "ovmf",
                ..
            }
        ));
        assert!(!dir.path().join(NVRAM_FILE).exists());
    }

    #[test]
    fn qemu_args_per_firmware() {
        let dir = tempfile::tempdir().unwrap();
        let files = fake_files(dir.path());
        let bios = BootFirmware::Bios.qemu_args(&files, None).unwrap();
        assert_eq!(
            bios,
            ["-bios".to_string(), files.seabios.display().to_string()]
        );
        let nvram = dir.path().join("nvram.fd");
        let uefi = BootFirmware::Uefi { secure_boot: false }
            .qemu_args(&files, Some(&nvram))
            .unwrap()
            .join(" ");
        assert!(uefi.contains(&format!(
            "unit=0,readonly=on,file={}",
            files.ovmf_code.display()
        )));
        assert!(uefi.contains(&format!("unit=1,file={}", nvram.display())));
        assert!(!uefi.contains("smm=on"));
        let sb = BootFirmware::Uefi { secure_boot: true }
            .qemu_args(&files, Some(&nvram))
            .unwrap()
            .join(" ");
        assert!(sb.contains("smm=on"));
        assert!(sb.contains("property=secure,value=on"));
        assert!(sb.contains("ICH9-LPC.disable_s3=1"));
        assert!(sb.contains(&files.ovmf_code_secboot.display().to_string()));
        let gone = FirmwareFiles {
            seabios: dir.path().join("nope"),
            ..files
        };
        assert!(BootFirmware::Bios.qemu_args(&gone, None).is_err());
    }
}
