//! One `keel lb` process per load balancer in the store. The agent writes
//! the proxy's JSON document, starts the proxy with a loopback status
//! endpoint, and on a changed document rewrites it and sends SIGHUP: the
//! proxy applies it in place (established connections stay). What the
//! proxy reports (`GET /status`, counters left out so an unchanged tree
//! is not a new revision) goes back to the store as `observed`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum LbServerError {
    #[error("Cannot write the proxy document {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start the proxy of load balancer {id}")]
    Spawn {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The proxy of load balancer {id} exited ({status}); log: {log}")]
    Exited {
        id: String,
        status: String,
        log: String,
    },
    #[error(
        "The proxy of load balancer {id} did not answer on its status endpoint within {0:?}",
        WAIT
    )]
    NoStatus { id: String },
}

const WAIT: Duration = Duration::from_secs(10);

struct Proxy {
    child: Child,
    status: SocketAddr,
    /// The document the proxy was last told to apply.
    applied: Value,
}

pub struct LbServers {
    keel_bin: PathBuf,
    dir: PathBuf,
    running: HashMap<String, Proxy>,
    /// Documents whose proxy failed to start, with why: not retried until
    /// the document changes.
    failed: HashMap<String, (Value, String)>,
}

impl LbServers {
    pub fn new(keel_bin: PathBuf, dir: PathBuf) -> LbServers {
        LbServers {
            keel_bin,
            dir,
            running: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    fn document(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn log(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// Written beside and renamed over, so the proxy never reads half a file.
    fn write_document(&self, id: &str, doc: &Value) -> Result<(), LbServerError> {
        let path = self.document(id);
        let tmp = self.dir.join(format!("{id}.json.tmp"));
        let write_err = |source| LbServerError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(write_err)?;
        std::fs::write(&tmp, doc.to_string()).map_err(write_err)?;
        std::fs::rename(&tmp, &path).map_err(write_err)
    }

    /// Brings the proxy of `id` to `doc`: starts it, or reloads it in place.
    pub fn ensure(&mut self, id: &str, doc: &Value) -> Result<(), LbServerError> {
        if let Some(proxy) = self.running.get_mut(id) {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                let log = std::fs::read_to_string(self.log(id)).unwrap_or_default();
                self.running.remove(id);
                let error = LbServerError::Exited {
                    id: id.into(),
                    status: status.to_string(),
                    log: tail(&log),
                };
                self.failed
                    .insert(id.into(), (doc.clone(), error.to_string()));
                return Err(error);
            }
            if proxy.applied == *doc {
                return Ok(());
            }
            self.write_document(id, doc)?;
            if let Some(proxy) = self.running.get_mut(id) {
                signal(&proxy.child, libc::SIGHUP);
                proxy.applied = doc.clone();
                tracing::info!(lb = id, "load balancer document changed; proxy reloads it");
            }
            return Ok(());
        }
        if let Some((failed_doc, why)) = self.failed.get(id) {
            if failed_doc == doc {
                return Err(LbServerError::Exited {
                    id: id.into(),
                    status: "earlier".into(),
                    log: why.clone(),
                });
            }
        }
        self.failed.remove(id);
        match self.start(id, doc) {
            Ok(proxy) => {
                self.running.insert(id.into(), proxy);
                Ok(())
            }
            Err(e) => {
                self.failed.insert(id.into(), (doc.clone(), e.to_string()));
                Err(e)
            }
        }
    }

    fn start(&self, id: &str, doc: &Value) -> Result<Proxy, LbServerError> {
        self.write_document(id, doc)?;
        let spawn_err = |source| LbServerError::Spawn {
            id: id.into(),
            source,
        };
        let status = free_loopback_port().map_err(spawn_err)?;
        let log = std::fs::File::create(self.log(id)).map_err(spawn_err)?;
        let log2 = log.try_clone().map_err(spawn_err)?;
        let mut child = crate::children::end_with_agent(&mut Command::new(&self.keel_bin))
            .arg("lb")
            .arg("--config")
            .arg(self.document(id))
            .args(["--cores", "1", "--status-listen", &status.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(spawn_err)?;
        let start = Instant::now();
        loop {
            if let Ok(Some(exit)) = child.try_wait() {
                let log = std::fs::read_to_string(self.log(id)).unwrap_or_default();
                return Err(LbServerError::Exited {
                    id: id.into(),
                    status: exit.to_string(),
                    log: tail(&log),
                });
            }
            if fetch_status(status).is_some() {
                tracing::info!(lb = id, pid = child.id(), "load balancer proxy started");
                return Ok(Proxy {
                    child,
                    status,
                    applied: doc.clone(),
                });
            }
            if start.elapsed() > WAIT {
                crate::disk_servers::terminate(&mut child);
                return Err(LbServerError::NoStatus { id: id.into() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The proxy's status tree without counters, if it answers.
    pub fn status(&self, id: &str) -> Option<Value> {
        self.running
            .get(id)
            .and_then(|p| fetch_status(p.status))
            .map(|mut v| {
                strip_stats(&mut v);
                v
            })
    }

    /// Stops every proxy whose load balancer is not in `keep`.
    pub fn retain(&mut self, keep: &[String]) {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|id| !keep.contains(id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(mut proxy) = self.running.remove(&id) {
                crate::disk_servers::terminate(&mut proxy.child);
                tracing::info!(lb = %id, "load balancer deleted; proxy stopped");
            }
            let _ = std::fs::remove_file(self.document(&id));
            let _ = std::fs::remove_file(self.log(&id));
        }
        self.failed.retain(|id, _| keep.contains(id));
    }

    pub fn stop_all(&mut self) {
        for proxy in self.running.values_mut() {
            crate::disk_servers::terminate(&mut proxy.child);
        }
        self.running.clear();
    }
}

impl Drop for LbServers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped, so the pid
        // cannot name another process.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

fn fetch_status(addr: SocketAddr) -> Option<Value> {
    ureq::get(&format!("http://{addr}/status"))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()?
        .into_json()
        .ok()
}

/// Counters change on every request: leaving them out keeps the observed
/// tree (and the record's revision) still while nothing else changes.
fn strip_stats(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("stats");
            map.values_mut().for_each(strip_stats);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_stats),
        _ => {}
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_tree_has_no_counters() {
        let mut v = serde_json::json!({"id": "a", "stats": {"x": 1},
            "pools": [{"id": "p", "stats": {}, "members": [{"id": "m", "stats": {}, "operating_status": "ONLINE"}]}]});
        strip_stats(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"id": "a", "pools": [{"id": "p", "members": [{"id": "m", "operating_status": "ONLINE"}]}]})
        );
    }
}
