//! [`QemuVm`]: boots an image under QEMU with its serial console captured,
//! QMP on a socket and the guest's API port forwarded to a free loopback
//! port (user-mode networking only); killed on drop, and by the kernel if
//! the thread that started it dies. Used by the boot tests and
//! `keel bench image`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest port the appliance's API listens on.
pub const GUEST_API_PORT: u16 = 8080;

/// Why a VM could not be started or did not get where it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("Cannot start qemu-system-x86_64")]
    Spawn(#[source] std::io::Error),
    #[error("Cannot set up the VM ({what})")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited ({status}) while waiting for {what}; console tail:\n{tail}")]
    Exited {
        what: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("Timed out after {after:?} waiting for {what}; console tail:\n{tail}")]
    Timeout {
        what: String,
        after: Duration,
        tail: String,
    },
    #[error("QMP {command} failed: {reply}")]
    Qmp { command: String, reply: String },
}

/// A running QEMU guest.
pub struct QemuVm {
    child: Child,
    console: Arc<Mutex<Vec<u8>>>,
    qmp: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl QemuVm {
    /// Starts `qemu-system-x86_64 -machine q35` with `accel_args` (e.g.
    /// `-accel tcg -cpu max`), 1 GiB, a virtio NIC on user networking, and
    /// `boot_args` (kernel/initrd, firmware, drives). `label` names its
    /// scratch directory (`keel-fw-<label>-*` under the temp dir).
    pub fn start(
        label: &str,
        accel_args: &[&str],
        boot_args: &[String],
    ) -> Result<QemuVm, QemuError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("keel-fw-{label}-"))
            .tempdir()
            .map_err(|source| QemuError::Setup {
                what: "scratch directory",
                source,
            })?;
        let qmp = dir.path().join("qmp.sock");
        let port = free_port()?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35", "-m", "1024", "-smp", "1"])
            .args(accel_args)
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_API_PORT}"
            ))
            .args(boot_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent; between fork and exec the child only asks to be killed
        // when the thread that spawned it dies, so no QEMU outlives a
        // crashed test or bench.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(QemuError::Spawn)?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for mut pipe in pipes.into_iter().flatten() {
            let console = console.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    console
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
        Ok(QemuVm {
            child,
            console,
            qmp,
            port,
            _dir: dir,
        })
    }

    /// Everything QEMU and the guest printed so far.
    pub fn console(&self) -> String {
        let bytes = self.console.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// `http://127.0.0.1:<forwarded port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn tail(&self) -> String {
        let text = self.console();
        let start = text.len().saturating_sub(3000);
        text.get(start..).unwrap_or(&text).to_owned()
    }

    /// Polls until `ready` is true, failing early if QEMU exits.
    fn poll(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Self) -> bool,
    ) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return Ok(());
            }
            let exited = self.child.try_wait().map_err(|source| QemuError::Setup {
                what: "wait for qemu",
                source,
            })?;
            if let Some(status) = exited {
                return Err(QemuError::Exited {
                    what: what.into(),
                    status,
                    tail: self.tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    what: what.into(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the console shows `marker`.
    pub fn wait_console(&mut self, marker: &str, timeout: Duration) -> Result<(), QemuError> {
        self.poll(marker, timeout, |vm| vm.console().contains(marker))
    }

    /// Waits until `GET /healthz` on the forwarded port answers 200.
    pub fn wait_api(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let url = self.url("/healthz");
        self.poll(
            "GET /healthz = 200",
            timeout,
            |_| matches!(agent.get(&url).call(), Ok(r) if r.status() == 200),
        )
    }

    /// Presses the ACPI power button (QMP `system_powerdown`).
    pub fn power_button(&self) -> Result<(), QemuError> {
        let setup = |source| QemuError::Setup {
            what: "QMP socket",
            source,
        };
        let mut qmp = UnixStream::connect(&self.qmp).map_err(setup)?;
        qmp.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(setup)?;
        let mut reader = BufReader::new(qmp.try_clone().map_err(setup)?);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(setup)?; // greeting
        for command in ["qmp_capabilities", "system_powerdown"] {
            writeln!(qmp, "{{\"execute\":\"{command}\"}}").map_err(setup)?;
            loop {
                line.clear();
                if reader.read_line(&mut line).map_err(setup)? == 0 {
                    return Err(QemuError::Qmp {
                        command: command.into(),
                        reply: "connection closed".into(),
                    });
                }
                if line.contains("\"error\"") {
                    return Err(QemuError::Qmp {
                        command: command.into(),
                        reply: line.trim().into(),
                    });
                }
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Waits for QEMU to exit on its own (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.child.try_wait().map_err(|source| QemuError::Setup {
                what: "wait for qemu",
                source,
            })?;
            if let Some(status) = exited {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    what: "QEMU to exit".into(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, QemuError> {
    let setup = |source| QemuError::Setup {
        what: "free loopback port",
        source,
    };
    Ok(TcpListener::bind("127.0.0.1:0")
        .map_err(setup)?
        .local_addr()
        .map_err(setup)?
        .port())
}
