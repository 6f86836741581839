//! One `keel cdp replica` process per replica group (the DR site's side of
//! a protection group). Each group has a directory: `tls/` with the
//! credentials from the pairing (key 0600), `replica/` with the replica's
//! disks, undo logs and `status.json`, and the process log.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use keel_control::api::protection_groups::ReplicaCredentials;

use crate::disk_servers::terminate;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaServerError {
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start the replica of group {id}")]
    Spawn {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The replica of group {id} exited ({status}); log: {log}")]
    Exited {
        id: String,
        status: String,
        log: String,
    },
}

/// What one replica runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRun {
    pub listen: String,
    pub keep: usize,
    pub credentials: ReplicaCredentials,
}

struct Running {
    run: ReplicaRun,
    child: Child,
}

pub struct ReplicaServers {
    keel_bin: PathBuf,
    root: PathBuf,
    running: HashMap<String, Running>,
}

impl ReplicaServers {
    pub fn new(keel_bin: PathBuf, root: PathBuf) -> ReplicaServers {
        ReplicaServers {
            keel_bin,
            root,
            running: HashMap::new(),
        }
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// The replica's data directory (disks, undo logs, `status.json`).
    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join("replica")
    }

    fn log(&self, id: &str) -> PathBuf {
        self.dir(id).join("replica.log")
    }

    /// The replica's `status.json`, if it wrote one.
    pub fn status(&self, id: &str) -> Option<serde_json::Value> {
        std::fs::read(self.data_dir(id).join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Runs the replica of `id` with `run` (restarted when it died or its
    /// settings changed). An exit is reported once, with its log.
    pub fn ensure(&mut self, id: &str, run: &ReplicaRun) -> Result<(), ReplicaServerError> {
        if let Some(r) = self.running.get_mut(id) {
            match r.child.try_wait() {
                Ok(None) if r.run == *run => return Ok(()),
                Ok(Some(status)) => {
                    self.running.remove(id);
                    return Err(ReplicaServerError::Exited {
                        id: id.into(),
                        status: status.to_string(),
                        log: tail(&self.log(id)),
                    });
                }
                _ => self.stop(id),
            }
        }
        let tls = self.dir(id).join("tls");
        let write = |name: &str, text: &str, mode: u32| -> Result<PathBuf, ReplicaServerError> {
            let path = tls.join(name);
            let err = |source| ReplicaServerError::Write {
                path: path.clone(),
                source,
            };
            std::fs::create_dir_all(&tls).map_err(err)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
            Ok(path)
        };
        let c = &run.credentials;
        let ca = write("ca.pem", &c.ca_pem, 0o644)?;
        let cert = write("replica.pem", &c.cert_pem, 0o644)?;
        let key = write("replica.key", &c.key_pem, 0o600)?;
        let log_path = self.log(id);
        let spawn_err = |source| ReplicaServerError::Spawn {
            id: id.into(),
            source,
        };
        let log = std::fs::File::create(&log_path).map_err(spawn_err)?;
        let log2 = log.try_clone().map_err(spawn_err)?;
        let child = Command::new(&self.keel_bin)
            .args(["cdp", "replica", "--listen", &run.listen])
            .arg("--dir")
            .arg(self.data_dir(id))
            .args(["--group", &c.group_number.to_string()])
            .args(["--source-site", &c.source_site.to_string()])
            .args(["--keep", &run.keep.to_string()])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--ca")
            .arg(ca)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(spawn_err)?;
        tracing::info!(group = %id, listen = %run.listen, "CDP replica started");
        self.running.insert(
            id.into(),
            Running {
                run: run.clone(),
                child,
            },
        );
        Ok(())
    }

    /// Stops the replica of `id` (SIGTERM: it finishes the segment it
    /// applies), waiting for it to exit.
    pub fn stop(&mut self, id: &str) {
        if let Some(mut r) = self.running.remove(id) {
            terminate(&mut r.child);
        }
    }

    /// Stops every replica not in `keep`.
    pub fn retain(&mut self, keep: &[String]) {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|id| !keep.contains(id))
            .cloned()
            .collect();
        for id in gone {
            self.stop(&id);
        }
    }

    pub fn stop_all(&mut self) {
        self.retain(&[]);
    }
}

impl Drop for ReplicaServers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
