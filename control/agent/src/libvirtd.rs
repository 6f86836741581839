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

/// Daemons this process started, so it can stop them again.
#[derive(Debug, Default)]
pub struct Started(Vec<&'static str>);

impl Started {
    /// SIGTERMs the daemons we started (running VMs are QEMU processes of
    /// their own and keep running; a later libvirtd re-attaches to them).
    pub fn stop(&mut self) {
        for daemon in self.0.drain(..).rev() {
            let pid_file = format!("/var/run/{daemon}.pid");
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<libc::pid_t>().ok());
            if let Some(pid) = pid.filter(|p| *p > 1) {
                tracing::info!(daemon, pid, "stopping");
                // SAFETY: kill(2) with a pid from the daemon's own pid file.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
    }
}

/// Connects to `uri`, starting the daemons first if nothing answers
/// (recorded in `started`).
pub fn connect(uri: &str, started: &mut Started) -> Result<Connect, LibvirtError> {
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
            started.0.push(daemon);
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
