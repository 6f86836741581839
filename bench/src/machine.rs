//! What a result was measured on.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineInfo {
    pub cpu_model: String,
    /// Logical CPUs this process may run on.
    pub cores: usize,
    pub kernel: String,
    pub memory_bytes: u64,
}

impl MachineInfo {
    pub fn probe() -> MachineInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        MachineInfo {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            memory_bytes: mem_total(&meminfo).unwrap_or(0),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t: x\n";
        assert_eq!(
            cpu_model(cpu).as_deref(),
            Some("AMD EPYC 7B13 64-Core Processor")
        );
        assert_eq!(
            mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24576000 * 1024)
        );
        assert_eq!(cpu_model("garbage"), None);
        assert_eq!(mem_total("MemTotal: lots kB"), None);
    }

    #[test]
    fn probe_reads_this_machine() {
        let m = MachineInfo::probe();
        assert!(m.cores >= 1);
        assert_ne!(m.kernel, "unknown");
        assert!(m.memory_bytes > 0);
    }
}
