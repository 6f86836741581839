//! One `keel vhost-blk` process per attached volume. A separate process per
//! disk keeps a disk fault (or a backend restart) from touching the agent
//! or other VMs; the backend accepts a new frontend connection after each
//! VM stop, so it lives as long as the volume is attached, and QEMU's
//! vhost-user reconnect covers a backend restart while the VM runs.
//!
//! The disks of a protection group are the exception: one `keel cdp source`
//! serves all of them on the same sockets (one journal gives the group one
//! write order), so a VM's QEMU reconnects to it when protection starts and
//! back to per-volume backends when it stops. This type is the one place
//! that knows which process serves a volume's socket.

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
    #[error("Cannot start the CDP source of protection group {group}")]
    GroupSpawn {
        group: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "The CDP source of protection group {group} exited before serving ({status}); log: {log}"
    )]
    GroupExited {
        group: String,
        status: String,
        log: String,
    },
}

/// What `keel cdp source` needs to serve and ship one protection group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdpGroup {
    pub id: String,
    /// Consistency group number (checked by the replica).
    pub number: u64,
    /// This site's number.
    pub site: u64,
    /// (volume id, raw image) in journal disk order.
    pub volumes: Vec<(String, PathBuf)>,
    pub journal: PathBuf,
    /// `source.pem`, `source.key`, `ca.pem`.
    pub pki: PathBuf,
    pub rpo_seconds: u64,
    /// Synchronous mode's fallback timeout; `None`: asynchronous.
    pub sync_timeout_seconds: Option<u64>,
    pub max_mbit: Option<u64>,
    pub replica: String,
    pub server_name: String,
}

impl CdpGroup {
    /// The shipper's status file.
    pub fn status_file(&self) -> PathBuf {
        self.journal.join("status.json")
    }
}

struct GroupServer {
    group: CdpGroup,
    child: Child,
}

const WAIT: Duration = Duration::from_secs(10);
/// Every volume's writes are tracked (bitmaps in `<volume>.raw.cbt`) so its
/// backups after the first read only what changed.
pub const CBT_GRANULARITY: u64 = 64 << 10;
/// vhost-blk's GET_ID answer is at most 20 bytes.
const SERIAL_LEN: usize = 20;

/// Which process serves a volume (see [`DiskServers::server_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskServer {
    /// No backend runs: the image is idle.
    None,
    /// Its own `keel vhost-blk`, with this control socket.
    Own(PathBuf),
    /// A protection group's CDP source (no control channel).
    Group,
}

pub struct DiskServers {
    keel_bin: PathBuf,
    run_dir: PathBuf,
    children: HashMap<String, Child>,
    groups: HashMap<String, GroupServer>,
}

impl DiskServers {
    pub fn new(keel_bin: PathBuf, run_dir: PathBuf) -> DiskServers {
        DiskServers {
            keel_bin,
            run_dir,
            children: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    pub fn socket(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.blk.sock"))
    }

    fn control_socket(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.blk.ctl"))
    }

    /// Who serves `volume` right now.
    pub fn server_of(&mut self, volume: &str) -> DiskServer {
        if self.group_of(volume).is_some() {
            return DiskServer::Group;
        }
        let running = self
            .children
            .get_mut(volume)
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)));
        if running {
            DiskServer::Own(self.control_socket(volume))
        } else {
            DiskServer::None
        }
    }

    fn log(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.blk.log"))
    }

    /// The protection group whose CDP source serves `volume`.
    fn group_of(&self, volume: &str) -> Option<String> {
        self.groups
            .iter()
            .find(|(_, g)| g.group.volumes.iter().any(|(v, _)| v == volume))
            .map(|(id, _)| id.clone())
    }

    /// Starts the backend for `volume` unless it is running; returns its socket.
    pub fn ensure(&mut self, volume: &str, image: &Path) -> Result<PathBuf, DiskServerError> {
        if let Some(group) = self.group_of(volume) {
            if let Some(g) = self.groups.get(&group) {
                let g = g.group.clone();
                self.serve_group(&g)?;
            }
            return Ok(self.socket(volume));
        }
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
        let serial = serial(volume);
        let mut child = Command::new(&self.keel_bin)
            .arg("vhost-blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(["--format", image_format(image)])
            .args(["--serial", &serial])
            .args(["--cbt-granularity", &CBT_GRANULARITY.to_string()])
            .arg("--control")
            .arg(self.control_socket(volume))
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

    /// Serves the disks of `group` from one `keel cdp source` (started,
    /// or restarted when it died or its settings changed), taking their
    /// sockets over from per-volume backends.
    pub fn serve_group(&mut self, group: &CdpGroup) -> Result<(), DiskServerError> {
        if let Some(g) = self.groups.get_mut(&group.id) {
            if g.group == *group && matches!(g.child.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        self.stop_group(&group.id);
        for (volume, _) in &group.volumes {
            self.stop(volume);
        }
        let _ = std::fs::create_dir_all(&self.run_dir);
        let log_path = self.run_dir.join(format!("{}.cdp.log", group.id));
        let spawn_err = |source| DiskServerError::GroupSpawn {
            group: group.id.clone(),
            source,
        };
        let log = std::fs::File::create(&log_path).map_err(spawn_err)?;
        let log2 = log.try_clone().map_err(spawn_err)?;
        let mut cmd = Command::new(&self.keel_bin);
        cmd.args(["cdp", "source"]);
        for (volume, image) in &group.volumes {
            let mut disk = self.socket(volume).into_os_string();
            disk.push("=");
            disk.push(image);
            disk.push(format!("={}", serial(volume)));
            cmd.arg("--disk").arg(disk);
        }
        cmd.arg("--journal")
            .arg(&group.journal)
            .args(["--group", &group.number.to_string()])
            .args(["--site", &group.site.to_string()])
            .args(["--rpo-secs", &group.rpo_seconds.to_string()])
            .args(["--replica", &group.replica])
            .args(["--server-name", &group.server_name])
            .arg("--cert")
            .arg(group.pki.join("source.pem"))
            .arg("--key")
            .arg(group.pki.join("source.key"))
            .arg("--ca")
            .arg(group.pki.join("ca.pem"))
            .args(["--cbt-granularity", &CBT_GRANULARITY.to_string()]);
        if let Some(t) = group.sync_timeout_seconds {
            cmd.args(["--sync-timeout-secs", &t.to_string()]);
        }
        if let Some(m) = group.max_mbit {
            cmd.args(["--max-mbit", &m.to_string()]);
        }
        for (volume, _) in &group.volumes {
            let _ = std::fs::remove_file(self.socket(volume));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(spawn_err)?;
        let start = Instant::now();
        while !group.volumes.iter().all(|(v, _)| self.socket(v).exists()) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(DiskServerError::GroupExited {
                    group: group.id.clone(),
                    status: status.to_string(),
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            if start.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DiskServerError::GroupExited {
                    group: group.id.clone(),
                    status: format!("no sockets within {WAIT:?}"),
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(group = %group.id, disks = group.volumes.len(), replica = %group.replica, "CDP source serving the group's disks");
        self.groups.insert(
            group.id.clone(),
            GroupServer {
                group: group.clone(),
                child,
            },
        );
        Ok(())
    }

    /// Stops a group's CDP source (SIGTERM: it seals its journal and saves
    /// the disks' changed-block bitmaps); its volumes have no backend until
    /// [`DiskServers::ensure`]d again. Returns the group it served.
    pub fn stop_group(&mut self, id: &str) -> Option<CdpGroup> {
        let mut g = self.groups.remove(id)?;
        // Its stop drains the journal to the replica (bounded at 30 s).
        terminate_within(&mut g.child, GROUP_STOP_WAIT);
        for (volume, _) in &g.group.volumes {
            let _ = std::fs::remove_file(self.socket(volume));
        }
        Some(g.group)
    }

    /// Groups whose CDP source was started (and not stopped).
    pub fn groups(&self) -> Vec<CdpGroup> {
        self.groups.values().map(|g| g.group.clone()).collect()
    }

    /// Stops the backend of `volume` (SIGTERM: it flushes and saves its
    /// changed-block bitmaps), waiting for it to exit. A volume a group's
    /// CDP source serves stays served (it stops with the group).
    pub fn stop(&mut self, volume: &str) {
        let Some(mut child) = self.children.remove(volume) else {
            return;
        };
        terminate(&mut child);
        let _ = std::fs::remove_file(self.socket(volume));
        let _ = std::fs::remove_file(self.control_socket(volume));
    }

    pub fn stop_all(&mut self) {
        let volumes: Vec<String> = self.children.keys().cloned().collect();
        for v in volumes {
            self.stop(&v);
        }
        let groups: Vec<String> = self.groups.keys().cloned().collect();
        for g in groups {
            self.stop_group(&g);
        }
    }
}

/// The format a volume file is served as: its name says (see
/// `volumes::volume_path`), never its content.
fn image_format(image: &Path) -> &'static str {
    if image.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    }
}

/// The disk's GET_ID answer (vhost-blk allows 20 bytes), the same whichever
/// process serves it.
fn serial(volume: &str) -> String {
    volume
        .chars()
        .filter(|c| *c != '-')
        .take(SERIAL_LEN)
        .collect()
}

impl Drop for DiskServers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A CDP source's stop: drain (≤ 30 s) and seal.
const GROUP_STOP_WAIT: Duration = Duration::from_secs(45);

pub(crate) fn terminate(child: &mut Child) {
    terminate_within(child, WAIT);
}

/// SIGTERM, then SIGKILL if it has not exited after `wait`.
pub(crate) fn terminate_within(child: &mut Child, wait: Duration) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped
        // yet, so it cannot name another process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let start = Instant::now();
    while start.elapsed() < wait {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(pid = child.id(), "disk backend ignored SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}
