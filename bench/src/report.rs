//! The machine-readable result of a suite run.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{BenchError, MachineInfo, Scale};

/// A peer measured side by side with keel's component.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peer {
    /// What the peer is (e.g. "file append + fdatasync").
    pub name: String,
    pub value: f64,
}

/// One number a suite measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub name: String,
    pub unit: String,
    /// `true` when a bigger value is better (throughput), `false` for costs
    /// (latency); says which way the ratio should go.
    pub higher_is_better: bool,
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
    /// `value / peer.value`, present when a peer ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl Measurement {
    pub fn new(name: &str, unit: &str, higher_is_better: bool, value: f64) -> Measurement {
        Measurement {
            name: name.into(),
            unit: unit.into(),
            higher_is_better,
            value,
            peer: None,
            ratio: None,
        }
    }

    pub fn with_peer(mut self, peer_name: &str, peer_value: f64) -> Measurement {
        self.ratio = (peer_value != 0.0).then(|| self.value / peer_value);
        self.peer = Some(Peer {
            name: peer_name.into(),
            value: peer_value,
        });
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub suite: String,
    pub scale: String,
    pub keel_version: String,
    /// Unix seconds at the end of the run.
    pub finished_at: u64,
    pub machine: MachineInfo,
    pub results: Vec<Measurement>,
}

impl Report {
    pub fn new(suite: &str, scale: Scale, results: Vec<Measurement>) -> Report {
        Report {
            suite: suite.into(),
            scale: match scale {
                Scale::Quick => "quick",
                Scale::Full => "full",
            }
            .into(),
            keel_version: env!("CARGO_PKG_VERSION").into(),
            finished_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            machine: MachineInfo::probe(),
            results,
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let write = || -> std::io::Result<()> {
            let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            std::fs::write(path, json)
        };
        write().map_err(|source| BenchError::WriteResults {
            path: path.to_owned(),
            source,
        })
    }

    /// A table for people.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "suite {} ({}) on {} ({} cores, kernel {})\n",
            self.suite, self.scale, self.machine.cpu_model, self.machine.cores, self.machine.kernel
        );
        for m in &self.results {
            out.push_str(&format!("  {:<40} {:>14.1} {}", m.name, m.value, m.unit));
            if let (Some(peer), Some(ratio)) = (&m.peer, m.ratio) {
                out.push_str(&format!(
                    "   peer {:>14.1} ({})   ratio {:.2}",
                    peer.value, peer.name, ratio
                ));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_value_over_peer() {
        let m = Measurement::new("x", "ops/s", true, 300.0).with_peer("p", 100.0);
        assert_eq!(m.ratio, Some(3.0));
        let zero = Measurement::new("x", "ops/s", true, 1.0).with_peer("p", 0.0);
        assert_eq!(zero.ratio, None);
    }

    #[test]
    fn json_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let report = Report::new(
            "s",
            Scale::Quick,
            vec![Measurement::new("a", "s", false, 1.5)],
        );
        report.write_json(&path).unwrap();
        let back: Report = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, report);
    }
}
