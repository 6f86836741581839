//! One `keel vhost-blk` process per attached volume. A separate process per
//! disk keeps a disk fault (or a backend restart) from touching the agent
//! or other VMs; the backend accepts a new frontend connection after each
//! VM stop, so it lives as long as the volume is attached, and QEMU's
//! vhost-user reconnect covers a backend restart while the VM runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DiskServerError {
    #[error("Cannot start the disk backend for volume {volume}")]
    Spawn {
        volume: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The disk backend for volume {volume} exited before serving ({status}); log: {log}")]
    Exited {
        volume: String,
        status: String,
        log: String,
    },
    #[error(
        "The disk backend for volume {volume} did not create its socket within {0:?}",
        WAIT
    )]
    NoSocket { volume: String },
}

const WAIT: Duration = Duration::from_secs(10);
/// Every volume's writes are tracked (bitmaps in `<volume>.raw.cbt`) so its
/// backups after the first read only what changed.
pub const CBT_GRANULARITY: u64 = 64 << 10;
/// vhost-blk's GET_ID answer is at most 20 bytes.
const SERIAL_LEN: usize = 20;

pub struct DiskServers {
    keel_bin: PathBuf,
    run_dir: PathBuf,
    children: HashMap<String, Child>,
}

impl DiskServers {
    pub fn new(keel_bin: PathBuf, run_dir: PathBuf) -> DiskServers {
        DiskServers {
            keel_bin,
            run_dir,
            children: HashMap::new(),
        }
    }

    pub fn socket(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.blk.sock"))
    }

    fn log(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.blk.log"))
    }

    /// Starts the backend for `volume` unless it is running; returns its socket.
    pub fn ensure(&mut self, volume: &str, image: &Path) -> Result<PathBuf, DiskServerError> {
        let socket = self.socket(volume);
        if let Some(child) = self.children.get_mut(volume) {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(socket);
            }
            self.children.remove(volume);
        }
        let _ = std::fs::create_dir_all(&self.run_dir);
        let _ = std::fs::remove_file(&socket);
        let log_path = self.log(volume);
        let spawn_err = |source| DiskServerError::Spawn {
            volume: volume.into(),
            source,
        };
        let log = std::fs::File::create(&log_path).map_err(spawn_err)?;
        let log2 = log.try_clone().map_err(spawn_err)?;
        let serial: String = volume
            .chars()
            .filter(|c| *c != '-')
            .take(SERIAL_LEN)
            .collect();
        let mut child = Command::new(&self.keel_bin)
            .arg("vhost-blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(["--serial", &serial])
            .args(["--cbt-granularity", &CBT_GRANULARITY.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(spawn_err)?;
        let start = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(DiskServerError::Exited {
                    volume: volume.into(),
                    status: status.to_string(),
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            if start.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DiskServerError::NoSocket {
                    volume: volume.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children.insert(volume.into(), child);
        Ok(socket)
    }

    /// Stops the backend of `volume` (SIGTERM: it flushes and saves its
    /// changed-block bitmaps), waiting for it to exit.
    pub fn stop(&mut self, volume: &str) {
        let Some(mut child) = self.children.remove(volume) else {
            return;
        };
        terminate(&mut child);
        let _ = std::fs::remove_file(self.socket(volume));
    }

    pub fn stop_all(&mut self) {
        let volumes: Vec<String> = self.children.keys().cloned().collect();
        for v in volumes {
            self.stop(&v);
        }
    }

    /// Volumes whose backend is running.
    pub fn running(&self) -> impl Iterator<Item = &String> {
        self.children.keys()
    }
}

impl Drop for DiskServers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

pub(crate) fn terminate(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped
        // yet, so it cannot name another process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(pid = child.id(), "disk backend ignored SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}
