//! Shared by the namespace tests: a lab of host namespaces wired by veths
//! to a "switch" namespace that runs the data plane (`dpN` there, `eth0`
//! in each host, TX checksum offload off: see the crate docs), and the
//! helpers every such test needs.
#![allow(dead_code)] // each test binary uses its part

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_dataplane::control::{request, Request, Response};
use keel_dataplane::model::{DesiredState, RouterPortSpec, RouterSpec};
use keel_testkit::{veth_pair, NetnsHost};

/// One host namespace of a lab.
pub struct Host {
    pub name: &'static str,
    pub mac: &'static str,
    /// `address/len`; empty for a mirror collector (no address, MTU 1600 so
    /// encapsulated copies of full-size frames fit).
    pub cidr: &'static str,
    /// Default route; empty for none.
    pub gateway: &'static str,
}

pub struct Lab {
    pub hosts: Vec<NetnsHost>,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    // Dropped last: kills the data plane, then removes the namespace.
    _switch: NetnsHost,
}

/// Router `r` between switches `a` (10.0.1.1, fd00:1::1) and `b`
/// (10.0.2.1, fd00:2::1), the gateways of the two-subnet tests.
pub fn router_ab() -> RouterSpec {
    let port = |switch: &str, n: u8| RouterPortSpec {
        switch: switch.into(),
        mac: format!("02:00:00:00:ff:{n:02x}"),
        ip: format!("10.0.{n}.1"),
        ip6: Some(format!("fd00:{n}::1")),
    };
    RouterSpec {
        name: "r".into(),
        ports: vec![port("a", 1), port("b", 2)],
        static_routes: vec![],
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keel-dataplane")
}

pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the data plane behind `socket` answers its control socket.
pub fn wait_up(socket: &std::path::Path) {
    wait_for(
        || matches!(request(socket, &Request::Get), Ok(Response::State { .. })),
        "the data plane to come up",
    );
}

/// Runs `f` on a thread inside namespace `ns`; sockets it opens live there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            f()
        })
        .join()
        .unwrap()
    })
}

impl Lab {
    /// Hosts on `dp0..`, the data plane started on them with `state`.
    pub fn start(label: &str, hosts: &[Host], state: &DesiredState) -> Lab {
        Lab::start_with(label, hosts, state, &[])
    }

    /// [`Lab::start`] with more data-plane options (e.g. `--workers 2`).
    pub fn start_with(label: &str, hosts: &[Host], state: &DesiredState, extra: &[&str]) -> Lab {
        let switch = NetnsHost::new(label).unwrap();
        let mut made = Vec::new();
        for (i, spec) in hosts.iter().enumerate() {
            let host = NetnsHost::new(spec.name).unwrap();
            let dp = format!("dp{i}");
            veth_pair(&switch, &dp, &host, "eth0").unwrap();
            host.ip(&["link", "set", "eth0", "address", spec.mac])
                .unwrap();
            host.sh(
                "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1",
            )
            .unwrap();
            if spec.cidr.is_empty() {
                host.ip(&["link", "set", "eth0", "mtu", "1600"]).unwrap();
                switch.ip(&["link", "set", &dp, "mtu", "1600"]).unwrap();
                host.ip(&["link", "set", "eth0", "up"]).unwrap();
            } else {
                host.add_addr("eth0", spec.cidr).unwrap();
            }
            if !spec.gateway.is_empty() {
                host.add_route("default", spec.gateway).unwrap();
            }
            host.exec(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
            switch.exec(&["ethtool", "-K", &dp, "tx", "off"]).unwrap();
            switch
                .sh(&format!("sysctl -qw net.ipv6.conf.{dp}.disable_ipv6=1"))
                .unwrap();
            made.push(host);
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("state.json");
        std::fs::write(&config, serde_json::to_vec(state).unwrap()).unwrap();
        let socket = dir.path().join("dp.sock");
        let mut args = vec![bin().to_string()];
        for i in 0..hosts.len() {
            args.extend(["--interface".into(), format!("dp{i}")]);
        }
        args.extend([
            "--config".into(),
            config.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        switch.spawn(&args).unwrap();
        let lab = Lab {
            hosts: made,
            socket,
            _dir: dir,
            _switch: switch,
        };
        wait_up(&lab.socket);
        lab
    }

    pub fn ns(&self, i: usize) -> &str {
        self.hosts[i].name()
    }

    /// One control request; the data plane must answer.
    pub fn request(&self, req: &Request) -> Response {
        request(&self.socket, req).unwrap()
    }

    pub fn apply(&self, state: &DesiredState) {
        match self.request(&Request::Apply {
            state: state.clone(),
        }) {
            Response::Applied { .. } => {}
            other => panic!("{other:?}"),
        }
    }

    pub fn apply_err(&self, state: &DesiredState) -> String {
        match self.request(&Request::Apply {
            state: state.clone(),
        }) {
            Response::Error { message } => message,
            other => panic!("{other:?}"),
        }
    }
}
