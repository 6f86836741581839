//! What this host has, read from procfs and sysfs: CPU, memory, NUMA
//! nodes, NICs, disks and GPUs (with their IOMMU group, which makes them
//! candidates for VFIO passthrough). Reported to the control plane when the
//! agent starts, so the host becomes schedulable.

use std::fs;
use std::path::Path;

use keel_control::api::hosts::{Disk, Gpu, HostInventory, Nic, NumaNode};

fn read(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn link_name(path: impl AsRef<Path>) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn entries(dir: &str) -> Vec<(String, std::path::PathBuf)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `key : value` from /proc/cpuinfo's first processor.
fn cpuinfo_field(cpuinfo: &str, key: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// `MemTotal:  123 kB` → bytes.
fn meminfo_total(text: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let rest = l.split("MemTotal:").nth(1)?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

/// Counts CPUs in a list like `0-3,8,10-11`.
fn cpu_list_len(list: &str) -> u32 {
    list.split(',')
        .filter(|p| !p.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(part.parse::<u32>().is_ok()),
        })
        .sum()
}

pub fn collect() -> HostInventory {
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let mut sockets: Vec<&str> = cpuinfo
        .lines()
        .filter_map(|l| l.strip_prefix("physical id"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']))
        .collect();
    sockets.sort_unstable();
    sockets.dedup();
    let numa_nodes = entries("/sys/devices/system/node")
        .into_iter()
        .filter_map(|(name, path)| {
            let id = name.strip_prefix("node")?.parse::<u32>().ok()?;
            Some(NumaNode {
                id,
                memory_bytes: read(path.join("meminfo"))
                    .map(|m| {
                        m.lines()
                            .find(|l| l.contains("MemTotal:"))
                            .and_then(|l| l.split_whitespace().rev().nth(1))
                            .and_then(|kb| kb.parse::<u64>().ok())
                            .unwrap_or(0)
                            * 1024
                    })
                    .unwrap_or(0),
                cpus: cpu_list_len(&read(path.join("cpulist")).unwrap_or_default()),
            })
        })
        .collect();
    let nics = entries("/sys/class/net")
        .into_iter()
        .filter(|(name, path)| name != "lo" && path.join("device").exists())
        .map(|(name, path)| Nic {
            mac: read(path.join("address")).unwrap_or_default(),
            driver: link_name(path.join("device/driver")).unwrap_or_default(),
            speed_mbps: read(path.join("speed")).and_then(|s| s.parse::<i64>().ok()),
            pci: link_name(path.join("device")).unwrap_or_default(),
            name,
        })
        .collect();
    let disks = entries("/sys/block")
        .into_iter()
        .filter(|(name, _)| {
            !["loop", "ram", "zram", "dm-", "sr"]
                .iter()
                .any(|p| name.starts_with(p))
        })
        .map(|(name, path)| Disk {
            size_bytes: read(path.join("size"))
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                * 512,
            rotational: read(path.join("queue/rotational")).as_deref() == Some("1"),
            model: read(path.join("device/model")).unwrap_or_default(),
            name,
        })
        .collect();
    let gpus = entries("/sys/bus/pci/devices")
        .into_iter()
        .filter(|(_, path)| {
            // PCI class 0x03xxxx: display controllers; 0x1200: accelerators.
            read(path.join("class")).is_some_and(|c| c.starts_with("0x03") || c.starts_with("0x12"))
        })
        .map(|(pci, path)| Gpu {
            vendor_id: read(path.join("vendor")).unwrap_or_default(),
            device_id: read(path.join("device")).unwrap_or_default(),
            driver: link_name(path.join("driver")).unwrap_or_default(),
            iommu_group: link_name(path.join("iommu_group")),
            pci,
        })
        .collect();
    HostInventory {
        hostname: read("/proc/sys/kernel/hostname").unwrap_or_default(),
        cpu_arch: std::env::consts::ARCH.into(),
        cpu_vendor: cpuinfo_field(&cpuinfo, "vendor_id"),
        cpu_model: cpuinfo_field(&cpuinfo, "model name"),
        cores,
        sockets: u32::try_from(sockets.len().max(1)).unwrap_or(1),
        memory_bytes: meminfo_total(&read("/proc/meminfo").unwrap_or_default()),
        numa_nodes,
        nics,
        disks,
        gpus,
        kvm: Path::new("/dev/kvm").exists(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        uplinks: Default::default(),
    }
}

/// This machine's stable id: systemd's machine-id as a UUID, so the host
/// keeps its identity across agent restarts.
pub fn machine_id() -> Option<String> {
    let id = read("/etc/machine-id")?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!(
        "{}-{}-{}-{}-{}",
        &id[0..8],
        &id[8..12],
        &id[12..16],
        &id[16..20],
        &id[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count() {
        assert_eq!(cpu_list_len("0-3,8,10-11"), 7);
        assert_eq!(cpu_list_len(""), 0);
        assert_eq!(cpu_list_len("0"), 1);
    }

    #[test]
    fn this_host_has_cpus_and_memory() {
        let inv = collect();
        assert!(inv.cores >= 1);
        assert!(inv.memory_bytes > 0);
        assert!(!inv.cpu_arch.is_empty());
    }
}
