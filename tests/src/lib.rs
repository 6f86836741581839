//! Fixtures for keel's integration tests: real network-namespace hosts and
//! real QEMU guests, each of which removes everything it made when dropped,
//! also when the test panics.
//!
//! - [`NetnsHost`]: a Linux network namespace as a "host", with veth links
//!   between hosts ([`veth_pair`]) and commands run inside it.
//! - [`Guest`]: a tiny Linux VM (Debian's kernel, a busybox initramfs) under
//!   QEMU, with shared guest memory so vhost-user devices can attach, its
//!   serial console captured, and shell commands run over that console.
//! - [`KeelProcess`]: the real `keel` binary serving on a loopback port.
//! - [`PostgresServer`]: a private PostgreSQL cluster on a loopback port.
//!
//! Everything needs root (namespaces) and the packages the README's test
//! command installs (iproute2, qemu-system-x86, busybox-static,
//! linux-image-amd64).

mod cmd;
pub mod guest;
pub mod keel;
pub mod netns;
pub mod postgres;

pub use cmd::{run, CmdOutput};
pub use guest::{guest_disk_image, guest_disk_image_with, Accel, Guest, GuestConfig};
pub use keel::{keel_bin, KeelProcess};
pub use keel_firmware::disk::BootLoader;
pub use netns::{root_veth, serve_greeting, veth_pair, NetnsHost};
pub use postgres::PostgresServer;

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("Cannot run `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Timed out after {after:?} waiting for {what}; console tail:\n{tail}")]
    Timeout {
        what: String,
        after: Duration,
        tail: String,
    },
    #[error("Guest exited while waiting for {what}; console tail:\n{tail}")]
    GuestExited { what: String, tail: String },
    #[error("Guest image: {0}")]
    Image(String),
    #[error("Guest image archive")]
    Cpio(#[from] keel_firmware::cpio::CpioError),
    #[error("Guest kernel")]
    Kernel(#[from] keel_firmware::kernel::KernelError),
}

pub type Result<T> = std::result::Result<T, FixtureError>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FixtureError {
    let what = what.into();
    move |source| FixtureError::Io { what, source }
}

/// Cargo's target directory, where cached fixture artifacts live.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        },
        PathBuf::from,
    )
}

/// Is a process with this pid alive (and not a zombie of ours)?
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; a zombie has exited already.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `len` bytes of deterministic pseudo-random data (xorshift64 from
/// `seed`): incompressible, never deduplicated against another seed's, and
/// the same on every run, so a failure reproduces.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
