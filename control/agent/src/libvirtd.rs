//! Reaching libvirt: connect, and when the system daemon is not running
//! (an appliance or CI machine without systemd units), start `virtlogd`
//! and `libvirtd` ourselves and wait for the socket.

use std::process::Command;
use std::time::{Duration, Instant};

use virt::connect::Connect;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("Cannot start {daemon} (install libvirt-daemon-system)")]
    Start {
        daemon: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("libvirt at {uri} did not answer within {waited:?}: {message}")]
    Connect {
        uri: String,
        waited: Duration,
        message: String,
    },
}

const START_WAIT: Duration = Duration::from_secs(20);

/// Connects to `uri`, starting the daemons first if nothing answers.
pub fn connect(uri: &str) -> Result<Connect, LibvirtError> {
    if let Ok(conn) = Connect::open(Some(uri)) {
        return Ok(conn);
    }
    for dir in ["/var/log/libvirt", "/var/run/libvirt"] {
        let _ = std::fs::create_dir_all(dir);
    }
    for daemon in ["virtlogd", "libvirtd"] {
        let running = Command::new("pgrep")
            .args(["-x", daemon])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !running {
            tracing::info!(daemon, "starting");
            let status = Command::new(daemon)
                .arg("-d")
                .status()
                .map_err(|source| LibvirtError::Start { daemon, source })?;
            if !status.success() {
                return Err(LibvirtError::Start {
                    daemon,
                    source: std::io::Error::other(format!("exited with {status}")),
                });
            }
        }
    }
    let start = Instant::now();
    loop {
        match Connect::open(Some(uri)) {
            Ok(conn) => return Ok(conn),
            Err(e) if start.elapsed() >= START_WAIT => {
                return Err(LibvirtError::Connect {
                    uri: uri.into(),
                    waited: START_WAIT,
                    message: e.to_string(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
