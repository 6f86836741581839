//! keel's benchmark harness: `keel bench <suite> [--json FILE]`.
//!
//! A suite runs keel's component and, where one exists, a peer doing the same
//! job side by side in the same process, and reports both. The machines are
//! noisy, so the number to quote is the ratio against the peer, not the
//! absolute value. Results carry the machine they were measured on.
//!
//! Adding a suite: one module in `suites/` exposing a [`Suite`], listed in
//! [`suites::ALL`].

pub mod machine;
pub mod report;
pub mod suites;

pub use machine::MachineInfo;
pub use report::{Measurement, Peer, Report};

/// How much work a suite does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// A pass short enough for CI; proves the suite runs, numbers are rough.
    Quick,
    /// The full run for capacity planning.
    Full,
}

/// A named benchmark suite.
pub struct Suite {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(Scale) -> Result<Vec<Measurement>, BenchError>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("Unknown suite {0:?} (known: {1})")]
    UnknownSuite(String, String),
    #[error("Suite I/O failed")]
    Io(#[from] std::io::Error),
    #[error("State store failed")]
    Store(#[from] keel_control::store::StoreError),
    #[error("Appliance image build failed")]
    Image(#[from] keel_firmware::appliance::ImageError),
    #[error("Appliance image archive failed")]
    Archive(#[from] keel_firmware::cpio::CpioError),
    #[error("Appliance VM failed")]
    Vm(#[from] keel_firmware::qemu::QemuError),
    #[error("Guest network bench: {step}")]
    Guest {
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Guest transfer incomplete: {0}")]
    Transfer(String),
    #[error("Cannot write results to {path}")]
    WriteResults {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the named suite and returns its report.
pub fn run(name: &str, scale: Scale) -> Result<Report, BenchError> {
    let suite = suites::find(name).ok_or_else(|| {
        let known: Vec<_> = suites::ALL.iter().map(|s| s.name).collect();
        BenchError::UnknownSuite(name.to_owned(), known.join(", "))
    })?;
    let measurements = (suite.run)(scale)?;
    Ok(Report::new(suite.name, scale, measurements))
}
