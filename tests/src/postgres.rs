//! [`PostgresServer`]: a private PostgreSQL cluster (Debian's `postgresql`
//! package) on a free loopback port, stopped and deleted on drop.
//!
//! PostgreSQL refuses to run as root, so `initdb` and the server run as the
//! `postgres` user the package creates, in a directory owned by it. The
//! cluster trusts every local connection: it listens on 127.0.0.1 only and
//! its Unix socket lives in the cluster directory, so only this machine's
//! root (the test) can reach it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::cmd::{capture, run};
use crate::{io_err, CmdOutput, FixtureError, Result};

/// A fresh cluster starts in about a second; CI under load takes longer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where Debian installs the server binaries of its default major version.
fn pg_bin_dir() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(io_err(
            "List /usr/lib/postgresql (is Debian's postgresql installed?)",
        ))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| FixtureError::Image("no PostgreSQL server under /usr/lib/postgresql".into()))
}

/// A running PostgreSQL cluster; the server is killed and its directory
/// removed when this is dropped.
pub struct PostgresServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PostgresServer {
    /// `initdb` a new cluster in a temporary directory and start it on a
    /// free loopback port; returns once it accepts connections. Test data is
    /// thrown away, so the server skips fsync.
    pub fn start() -> Result<PostgresServer> {
        PostgresServer::start_with(false)
    }

    /// As [`PostgresServer::start`], but every commit is fsynced like a
    /// production server's (for benchmarks against durable peers).
    pub fn start_durable() -> Result<PostgresServer> {
        PostgresServer::start_with(true)
    }

    fn start_with(durable: bool) -> Result<PostgresServer> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let bin = pg_bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "keelt-pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(io_err(format!("Create {}", data.display())))?;
        let dir_s = dir.display().to_string();
        run(&["chown", "-R", "postgres:postgres", &dir_s])?;
        let data_s = data.display().to_string();
        let initdb = bin.join("initdb").display().to_string();
        run(&[
            "runuser",
            "-u",
            "postgres",
            "--",
            &initdb,
            "-D",
            &data_s,
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
        ])?;
        let port = free_port()?;
        let postgres = bin.join("postgres");
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&postgres)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={dir_s}"))
            .arg("-c")
            .arg(if durable { "fsync=on" } else { "fsync=off" })
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("server.log"))
                    .map_err(io_err("Create server.log"))?,
            )
            .spawn()
            .map_err(|source| FixtureError::Spawn {
                cmd: format!("{} -D {data_s}", postgres.display()),
                source,
            })?;
        let server = PostgresServer { child, dir, port };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let out = self.psql_raw("SELECT 1")?;
            if out.success {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(FixtureError::Timeout {
                    what: "PostgreSQL to accept connections".into(),
                    after: START_TIMEOUT,
                    tail: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL of the `postgres` database as the superuser.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL through `psql` over TCP, stopping at the first error;
    /// returns the unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = self.psql_raw(sql)?;
        if !out.success {
            return Err(FixtureError::Command {
                cmd: format!("psql -c {sql:?}"),
                status: format!("{:?}", out.code),
                stderr: out.stderr,
            });
        }
        Ok(out.stdout)
    }

    fn psql_raw(&self, sql: &str) -> Result<CmdOutput> {
        let port = self.port.to_string();
        capture(&[
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        ])
    }

    /// The server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown; the postmaster takes its backends down.
        let postmaster = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = postmaster {
            // SAFETY: kill(2) with a pid read from the cluster's own pid file.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("Bind a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("Read the free port"))?
        .port();
    Ok(port)
}
