//! Finding the installed Debian kernel and resolving kernel modules with
//! their dependencies from `modules.dep`, for initramfs builders.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the kernel or a module could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("No {boot}/vmlinuz-* with modules under {modules}; install linux-image-amd64")]
    NoKernel { boot: PathBuf, modules: PathBuf },
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Kernel module {0} not found")]
    UnknownModule(String),
    #[error("Cannot decompress {path} with {tool}")]
    Decompress {
        path: PathBuf,
        tool: &'static str,
        #[source]
        source: Option<std::io::Error>,
    },
}

/// An installed kernel image and its module tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// `/boot/vmlinuz-<version>`.
    pub image: PathBuf,
    /// `uname -r` of that kernel, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// `/lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

impl Kernel {
    /// The newest `/boot/vmlinuz-*` that has a module tree.
    pub fn newest_installed() -> Result<Kernel, KernelError> {
        Kernel::newest_in(Path::new("/boot"), Path::new("/lib/modules"))
    }

    /// The newest `<boot>/vmlinuz-*` with `<modules>/<version>/modules.dep`.
    /// "Newest" is the greatest version string, which is enough to be
    /// deterministic for one Debian release's kernel ABI names.
    pub fn newest_in(boot: &Path, modules: &Path) -> Result<Kernel, KernelError> {
        let read_err = |source| KernelError::Read {
            path: boot.to_owned(),
            source,
        };
        let mut versions: Vec<String> = fs::read_dir(boot)
            .map_err(read_err)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_prefix("vmlinuz-").map(str::to_owned))
            .filter(|v| modules.join(v).join("modules.dep").exists())
            .collect();
        versions.sort();
        let version = versions.pop().ok_or_else(|| KernelError::NoKernel {
            boot: boot.to_owned(),
            modules: modules.to_owned(),
        })?;
        Ok(Kernel {
            image: boot.join(format!("vmlinuz-{version}")),
            modules_dir: modules.join(&version),
            version,
        })
    }

    /// Module paths (relative to [`Kernel::modules_dir`]) for `wanted` and
    /// their dependencies, in load order. Built-in modules are skipped.
    pub fn resolve_modules(&self, wanted: &[&str]) -> Result<Vec<String>, KernelError> {
        let read = |name: &str| {
            let path = self.modules_dir.join(name);
            fs::read_to_string(&path).map_err(|source| KernelError::Read { path, source })
        };
        resolve_modules(
            &read("modules.dep")?,
            &read("modules.builtin").unwrap_or_default(),
            wanted,
        )
    }

    /// A module file as plain ELF (busybox's `insmod` loads nothing else).
    pub fn read_module(&self, relative: &str) -> Result<Vec<u8>, KernelError> {
        read_module(&self.modules_dir.join(relative))
    }
}

/// Module paths (relative to the module tree) in load order: dependencies
/// first, each module once; built-in modules are skipped, unknown ones are
/// an error.
pub fn resolve_modules(
    modules_dep: &str,
    builtin: &str,
    wanted: &[&str],
) -> Result<Vec<String>, KernelError> {
    let deps: HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module.trim(), deps.split_whitespace().collect()))
        .collect();
    let by_name: HashMap<String, &str> =
        deps.keys().map(|path| (module_name(path), *path)).collect();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit<'a>(
        path: &'a str,
        deps: &HashMap<&'a str, Vec<&'a str>>,
        seen: &mut BTreeSet<&'a str>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(path) {
            return;
        }
        for dep in deps.get(path).into_iter().flatten() {
            visit(dep, deps, seen, order);
        }
        order.push(path.to_owned());
    }
    for name in wanted {
        let name = name.replace('-', "_");
        match by_name.get(&name) {
            Some(path) => visit(path, &deps, &mut seen, &mut order),
            None if builtin.contains(&name) => {}
            None => return Err(KernelError::UnknownModule(name)),
        }
    }
    Ok(order)
}

/// `kernel/drivers/block/virtio_blk.ko.xz` → `virtio_blk`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module file, decompressed if the distribution compresses modules
/// (Debian 12 does not; later releases use xz or zstd).
pub fn read_module(path: &Path) -> Result<Vec<u8>, KernelError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        return fs::read(path).map_err(|source| KernelError::Read {
            path: path.to_owned(),
            source,
        });
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|source| KernelError::Decompress {
            path: path.to_owned(),
            tool,
            source: Some(source),
        })?;
    if !out.status.success() {
        return Err(KernelError::Decompress {
            path: path.to_owned(),
            tool,
            source: None,
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
";

    #[test]
    fn modules_resolve_dependencies_first_once() {
        let order = resolve_modules(
            DEP,
            "kernel/fs/ext4/ext4.ko\n",
            &["virtio_blk", "virtio-net", "ext4"],
        )
        .unwrap();
        let pos = |n: &str| order.iter().position(|m| module_name(m) == n).unwrap();
        assert!(pos("virtio_ring") < pos("virtio_blk"));
        assert!(pos("virtio") < pos("virtio_blk"));
        assert!(pos("failover") < pos("net_failover"));
        assert!(pos("net_failover") < pos("virtio_net"));
        assert_eq!(
            order.len(),
            6,
            "each module once, builtins skipped: {order:?}"
        );
    }

    #[test]
    fn unknown_module_is_an_error() {
        assert!(matches!(
            resolve_modules(DEP, "", &["nonexistent"]),
            Err(KernelError::UnknownModule(_))
        ));
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/drivers/net/virtio_net.ko.xz"),
            "virtio_net"
        );
        assert_eq!(module_name("kernel/x/nf-nat.ko"), "nf_nat");
    }

    #[test]
    fn newest_kernel_with_modules_wins() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        let modules = dir.path().join("modules");
        fs::create_dir_all(&boot).unwrap();
        for v in ["6.1.0-1-amd64", "6.1.0-2-amd64", "6.1.0-3-amd64"] {
            fs::write(boot.join(format!("vmlinuz-{v}")), b"k").unwrap();
        }
        // The newest image has no module tree: not usable.
        for v in ["6.1.0-1-amd64", "6.1.0-2-amd64"] {
            fs::create_dir_all(modules.join(v)).unwrap();
            fs::write(modules.join(v).join("modules.dep"), DEP).unwrap();
        }
        let k = Kernel::newest_in(&boot, &modules).unwrap();
        assert_eq!(k.version, "6.1.0-2-amd64");
        assert_eq!(k.image, boot.join("vmlinuz-6.1.0-2-amd64"));
        assert_eq!(k.resolve_modules(&["virtio_blk"]).unwrap().len(), 3);
        assert!(Kernel::newest_in(&modules, &modules).is_err());
    }
}
