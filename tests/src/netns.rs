//! [`NetnsHost`]: a network namespace standing in for a host.
//!
//! Names are `keelt-<pid>-<seq>-<label>`: the pid lets a later run find and
//! sweep namespaces whose creator died without cleaning up (a SIGKILLed or
//! crashed test), and nothing outside that prefix is ever touched. All links
//! are created directly inside the namespaces, so the host's own interfaces
//! and routes never change.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::cmd::{capture, check, run, CmdOutput};
use crate::{pid_alive, FixtureError, Result};

/// Prefix of every namespace this crate creates.
pub const PREFIX: &str = "keelt-";

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEPT: std::sync::Once = std::sync::Once::new();

/// A network namespace with loopback up, removed (with every process still
/// running in it) on drop.
#[derive(Debug)]
pub struct NetnsHost {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl NetnsHost {
    /// Creates `keelt-<pid>-<seq>-<label>`; `label` is for people reading
    /// `ip netns list` and is cut to 12 alphanumerics.
    pub fn new(label: &str) -> Result<NetnsHost> {
        SWEPT.call_once(sweep_stale);
        let label: String = label
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{seq}-{label}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        // From here on, drop removes the namespace even if set-up fails.
        let host = NetnsHost {
            name,
            children: Mutex::new(Vec::new()),
        };
        host.ip(&["link", "set", "lo", "up"])?;
        Ok(host)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace; returns its output whatever its
    /// exit status.
    pub fn capture(&self, args: &[&str]) -> Result<CmdOutput> {
        capture(&self.wrap(args))
    }

    /// Runs a command inside the namespace that must succeed.
    pub fn exec(&self, args: &[&str]) -> Result<CmdOutput> {
        let full = self.wrap(args);
        check(&full, capture(&full)?)
    }

    /// Runs a shell snippet inside the namespace that must succeed; returns stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        Ok(self.exec(&["sh", "-c", script])?.stdout)
    }

    /// `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<CmdOutput> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Adds an address (`198.18.0.1/24`) to an interface and sets it up.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", ifname])?;
        self.ip(&["link", "set", "dev", ifname, "up"])?;
        Ok(())
    }

    /// Adds a route (`default` or a CIDR) via a gateway.
    pub fn add_route(&self, dest: &str, via: &str) -> Result<()> {
        self.ip(&["route", "add", dest, "via", via])?;
        Ok(())
    }

    /// Starts a long-running command inside the namespace; it is killed when
    /// the host is dropped. Returns its pid.
    pub fn spawn(&self, args: &[&str]) -> Result<u32> {
        let full = self.wrap(args);
        let (program, rest) = full
            .split_first()
            .ok_or_else(|| FixtureError::Image("empty".into()))?;
        let child = Command::new(program)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| FixtureError::Spawn {
                cmd: full.join(" "),
                source,
            })?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    fn wrap<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        full
    }
}

impl Drop for NetnsHost {
    fn drop(&mut self) {
        for mut child in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_namespace(&self.name);
    }
}

/// A veth pair with one end in each host, both set up. Interface names are
/// local to their namespace, so `eth0` may be used in every host.
pub fn veth_pair(a: &NetnsHost, a_if: &str, b: &NetnsHost, b_if: &str) -> Result<()> {
    run(&[
        "ip",
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", "dev", a_if, "up"])?;
    b.ip(&["link", "set", "dev", b_if, "up"])?;
    Ok(())
}

/// A veth pair from `host` (end `host_if`, up, TX checksum offload off so
/// a userspace switch sees whole checksums) to this (root) namespace, where
/// the returned end is up with no address: the uplink a data plane
/// forwards on, standing in for a host's NIC on an external network.
/// Deleting `host` (on drop, or the sweep of a crashed run's namespaces)
/// deletes both ends.
pub fn root_veth(host: &NetnsHost, host_if: &str) -> Result<String> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // Interface names have at most 15 bytes.
    let root_if = format!("ku{}x{seq}", std::process::id() % 1_000_000);
    run(&[
        "ip",
        "link",
        "add",
        &root_if,
        "type",
        "veth",
        "peer",
        "name",
        host_if,
        "netns",
        host.name(),
    ])?;
    // IPv6 off: no router solicitations or DAD from the host into the switch.
    let _ = capture(&[
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{root_if}.disable_ipv6=1"),
    ]);
    run(&["ip", "link", "set", "dev", &root_if, "up"])?;
    host.ip(&["link", "set", "dev", host_if, "up"])?;
    host.exec(&["ethtool", "-K", host_if, "tx", "off"])?;
    Ok(root_if)
}

/// Runs a TCP server on `port` in `host` that greets every client with
/// `greeting` and a newline, closes, and appends the client's address to
/// the file `peers` (what the server saw: tests of NAT read it).
pub fn serve_greeting(
    host: &NetnsHost,
    port: u16,
    greeting: &str,
    peers: &std::path::Path,
) -> Result<u32> {
    let script = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\n\
         while True:\n    c, a = s.accept()\n    \
         open({peers:?}, 'a').write(a[0] + '\\n')\n    \
         c.sendall({greeting:?}.encode() + b'\\n'); c.close()\n",
        peers = peers.display().to_string(),
    );
    host.spawn(&["python3", "-c", &script])
}

/// Kills what still runs in a namespace, then deletes it (which removes its
/// interfaces, and the peers of its veths).
fn remove_namespace(name: &str) {
    if let Ok(out) = capture(&["ip", "netns", "pids", name]) {
        for pid in out
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid read from the namespace; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = capture(&["ip", "netns", "delete", name]);
}

/// Namespaces of ours whose creating process is gone.
pub fn stale_namespaces() -> Vec<String> {
    let Ok(out) = capture(&["ip", "netns", "list"]) else {
        return Vec::new();
    };
    out.stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            name.strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !pid_alive(pid))
        })
        .map(str::to_owned)
        .collect()
}

/// Removes namespaces left behind by crashed runs.
pub fn sweep_stale() {
    for name in stale_namespaces() {
        remove_namespace(&name);
    }
}

/// Every namespace of ours that currently exists, stale or not.
pub fn our_namespaces() -> Vec<String> {
    let Ok(out) = capture(&["ip", "netns", "list"]) else {
        return Vec::new();
    };
    out.stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}
