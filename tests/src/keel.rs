//! [`KeelProcess`]: the real `keel` binary running `keel up` on a free
//! loopback port with its own state directory, killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{io_err, FixtureError, Result};

/// `keel up` on an idle machine is ready in well under a second; a cold
/// SQLite file system under CI load can take longer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `keel` binary cargo built next to the running test executable
/// (`target/<profile>/keel`), or `KEEL_BIN`.
pub fn keel_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("KEEL_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/keel
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    profile_dir.join("keel")
}

#[derive(Default)]
struct Lines {
    lines: Mutex<(Vec<String>, bool)>,
    grew: Condvar,
}

/// A `keel` process whose stderr (JSON logs) is collected line by line.
pub struct KeelProcess {
    child: Child,
    stderr: Arc<Lines>,
    /// Address the API listens on, once [`KeelProcess::up`] saw it.
    pub addr: Option<String>,
}

impl KeelProcess {
    /// Starts `keel --log-format json <args>`.
    pub fn spawn(args: &[&str]) -> Result<KeelProcess> {
        let bin = keel_bin();
        let mut child = Command::new(&bin)
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env_remove("KEEL_LISTEN")
            .env_remove("KEEL_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| FixtureError::Spawn {
                cmd: format!("{} {}", bin.display(), args.join(" ")),
                source,
            })?;
        let stderr = Arc::new(Lines::default());
        if let Some(pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe)
                    .lines()
                    .map_while(std::result::Result::ok)
                {
                    let mut lines = sink.lines.lock().unwrap_or_else(|e| e.into_inner());
                    lines.0.push(line);
                    sink.grew.notify_all();
                }
                let mut lines = sink.lines.lock().unwrap_or_else(|e| e.into_inner());
                lines.1 = true;
                sink.grew.notify_all();
            });
        }
        Ok(KeelProcess {
            child,
            stderr,
            addr: None,
        })
    }

    /// Starts `keel up` on 127.0.0.1 port 0 with `state_dir`, and waits until
    /// it serves.
    pub fn up(state_dir: &Path) -> Result<KeelProcess> {
        KeelProcess::up_with(state_dir, &[])
    }

    /// As [`KeelProcess::up`], with more `keel up` options.
    pub fn up_with(state_dir: &Path, extra: &[&str]) -> Result<KeelProcess> {
        let dir = state_dir.to_string_lossy().into_owned();
        let mut args = vec!["up", "--listen", "127.0.0.1:0", "--state-dir", &dir];
        args.extend_from_slice(extra);
        let mut keel = KeelProcess::spawn(&args)?;
        let line = keel.wait_for_line("keel is up", START_TIMEOUT)?;
        keel.addr = serde_json_field(&line, "addr");
        if keel.addr.is_none() {
            return Err(FixtureError::Image(format!("no addr in {line}")));
        }
        Ok(keel)
    }

    /// `http://<addr>` of the API.
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.addr.as_deref().unwrap_or("127.0.0.1:0")
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.stderr.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(line) = lines.0.iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            let tail = lines.0.join("\n");
            if lines.1 {
                return Err(FixtureError::GuestExited {
                    what: needle.into(),
                    tail,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FixtureError::Timeout {
                    what: needle.into(),
                    after: timeout,
                    tail,
                });
            }
            lines = self
                .stderr
                .grew
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .join("\n")
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = i32::try_from(self.child.id())
            .map_err(|_| FixtureError::Image("pid out of range".into()))?;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io_err("signal keel")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits for the process to exit (and its stderr to be read to the end).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_err("wait for keel"))? {
                let mut lines = self.stderr.lines.lock().unwrap_or_else(|e| e.into_inner());
                while !lines.1 && Instant::now() < deadline {
                    lines = self
                        .stderr
                        .grew
                        .wait_timeout(lines, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(FixtureError::Timeout {
                    what: "keel to exit".into(),
                    after: timeout,
                    tail: self.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KeelProcess {
    fn drop(&mut self) {
        // keel's own helpers (disk servers, CDP source/replica, data plane,
        // load balancers) are its children running the keel binary; once
        // keel is killed they are orphans, so find them first.
        let helpers = keel_children(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in helpers {
            // SAFETY: kill(2) on a pid we just read as keel's child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Processes whose parent is `parent` and whose program is keel's binary
/// (libvirt's daemons, which keel may also start, are left alone).
fn keel_children(parent: u32) -> Vec<i32> {
    let bin = std::fs::canonicalize(keel_bin()).ok();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(std::result::Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent) && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == bin
        })
        .collect()
}

/// The string value of a top-level field in a JSON log line.
fn serde_json_field(line: &str, field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}
