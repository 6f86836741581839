//! `keel dataplane --vhost-user-net` as an operator runs it: the real keel
//! process serves two vhost-user-net sockets as data-plane ports; two QEMU
//! guests get their addresses from keel's DHCP and ping each other across
//! the distributed router.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use keel_dataplane::control::{request, Request, Response};
use keel_testkit::{Guest, GuestConfig};

/// The data-plane process, killed on drop (also when a test fails).
struct DataPlane(Child);

impl Drop for DataPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const STATE: &str = r#"{
  "switches": [
    {"name": "s1", "subnet": "10.0.1.0/24", "dhcp": {"lease_secs": 600}},
    {"name": "s2", "subnet": "10.0.2.0/24", "dhcp": {}}
  ],
  "ports": [
    {"name": "a", "switch": "s1", "interface": "vm-a", "mac": "52:54:00:00:01:10", "ips": ["10.0.1.10"]},
    {"name": "b", "switch": "s2", "interface": "vm-b", "mac": "52:54:00:00:02:10", "ips": ["10.0.2.10"]}
  ],
  "routers": [{"name": "r", "ports": [
    {"switch": "s1", "mac": "02:00:00:00:01:01", "ip": "10.0.1.1"},
    {"switch": "s2", "mac": "02:00:00:00:02:01", "ip": "10.0.2.1"}
  ]}]
}"#;

/// Starts `keel dataplane` with `config` and the control `socket` plus
/// `ports` arguments; returns once it answers on the socket.
fn start(config: &Path, socket: &Path, ports: &[String]) -> DataPlane {
    let child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("dataplane")
        .args(ports)
        .arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(socket)
        .spawn()
        .unwrap();
    let dp = DataPlane(child);
    // A hang guard counted in polls, not a speed check.
    for _ in 0..600 {
        if matches!(request(socket, &Request::Get), Ok(Response::State { .. })) {
            return dp;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("keel dataplane never answered on its control socket");
}

fn boot(name: &str, sock: &Path, mac: &str) -> Guest {
    Guest::boot(GuestConfig::new(name).memory_mib(256).qemu_args([
        "-chardev".to_string(),
        format!("socket,id=net0,path={}", sock.display()),
        "-netdev".into(),
        "vhost-user,chardev=net0,id=n0".into(),
        "-device".into(),
        // vectors=0: QEMU 7.2 under TCG crashes starting vhost-user-net with MSI-X.
        format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0"),
    ]))
    .unwrap()
}

/// busybox udhcpc with a script applying the lease; returns the lease line.
fn dhcp(guest: &mut Guest) -> String {
    guest
        .run(concat!(
            "printf '%s\\n' '#!/bin/sh' ",
            "'[ \"$1\" = bound ] || exit 0' ",
            "'ip addr add \"$ip/$mask\" dev \"$interface\"' ",
            "'ip route replace default via \"$router\"' ",
            "'echo \"lease ip=$ip mask=$mask router=$router\" > /tmp/lease' > /tmp/dhcp.sh",
            " && chmod +x /tmp/dhcp.sh && ip link set eth0 up"
        ))
        .unwrap();
    guest
        .run("udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /tmp/dhcp.sh >/dev/null 2>&1; cat /tmp/lease")
        .unwrap()
}

#[test]
fn keel_dataplane_serves_vm_nics_over_vhost_user() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (config, socket) = (dir.path().join("state.json"), dir.path().join("dp.sock"));
    std::fs::write(&config, STATE).unwrap();
    let _dp = start(
        &config,
        &socket,
        &[
            "--vhost-user-net".into(),
            format!("vm-a={}", sa.display()),
            "--vhost-user-net".into(),
            format!("vm-b={}", sb.display()),
        ],
    );

    let mut a = boot("cli-vnet-a", &sa, "52:54:00:00:01:10");
    let mut b = boot("cli-vnet-b", &sb, "52:54:00:00:02:10");
    let lease = dhcp(&mut a);
    assert!(
        lease.contains("ip=10.0.1.10 mask=24 router=10.0.1.1"),
        "{lease}"
    );
    let lease = dhcp(&mut b);
    assert!(
        lease.contains("ip=10.0.2.10 mask=24 router=10.0.2.1"),
        "{lease}"
    );
    let out = a.run("ping -c 3 -W 5 10.0.2.10").unwrap();
    assert!(out.contains("3 packets received"), "{out}");

    let Response::Stats { stats } = request(&socket, &Request::Stats).unwrap() else {
        panic!("no stats");
    };
    assert!(stats.port("vm-a").unwrap().rx_packets > 0, "{stats:?}");
    assert!(stats.outcomes["dhcp_ack_sent"] >= 2, "{stats:?}");
    assert!(stats.outcomes["routed"] >= 6, "{stats:?}");
    a.poweroff(Duration::from_secs(60)).unwrap();
    b.poweroff(Duration::from_secs(60)).unwrap();
}

const UPLINK_STATE: &str = r#"{
  "switches": [
    {"name": "s1", "subnet": "10.0.1.0/24", "dhcp": {}},
    {"name": "ext", "subnet": "198.18.0.0/24"}
  ],
  "ports": [
    {"name": "a", "switch": "s1", "interface": "vm-a", "mac": "52:54:00:00:01:10", "ips": ["10.0.1.10"]},
    {"name": "up", "switch": "ext", "interface": "UPLINK", "port_security": false}
  ],
  "routers": [{"name": "r", "ports": [
    {"switch": "s1", "mac": "02:00:00:00:01:01", "ip": "10.0.1.1"},
    {"switch": "ext", "mac": "02:00:00:00:09:01", "ip": "198.18.0.2"}
  ], "static_routes": [{"prefix": "0.0.0.0/0", "next_hop": "198.18.0.1"}]}],
  "nat": [
    {"router": "r", "type": "snat", "external_ip": "198.18.0.2", "logical_ip": "10.0.1.0/24"}
  ]
}"#;

/// A VM NIC (vhost-user-net) and an uplink (AF_PACKET on a veth into an
/// "outside" namespace) on one data plane: the guest reaches a TCP server
/// outside, which sees the router's external address (SNAT); with a
/// floating IP applied in place the guest answers pings at it from outside.
#[test]
fn vm_nic_reaches_the_outside_through_an_uplink() {
    use keel_testkit::{root_veth, serve_greeting, NetnsHost};
    let dir = tempfile::tempdir().unwrap();
    let outside = NetnsHost::new("dpout").unwrap();
    let uplink = root_veth(&outside, "eth0").unwrap();
    outside.add_addr("eth0", "198.18.0.1/24").unwrap();
    let peers = dir.path().join("peers");
    serve_greeting(&outside, 7000, "HELLO-FROM-OUTSIDE", &peers).unwrap();
    let sa = dir.path().join("a.sock");
    let (config, socket) = (dir.path().join("state.json"), dir.path().join("dp.sock"));
    let state = UPLINK_STATE.replace("UPLINK", &uplink);
    std::fs::write(&config, &state).unwrap();
    let _dp = start(
        &config,
        &socket,
        &[
            "--interface".into(),
            uplink.clone(),
            "--vhost-user-net".into(),
            format!("vm-a={}", sa.display()),
        ],
    );
    let mut a = boot("cli-vnet-up", &sa, "52:54:00:00:01:10");
    let lease = dhcp(&mut a);
    assert!(lease.contains("router=10.0.1.1"), "{lease}");
    let (code, out) = a
        .exec("nc 198.18.0.1 7000 </dev/null", Duration::from_secs(60))
        .unwrap();
    let Response::Stats { stats } = request(&socket, &Request::Stats).unwrap() else {
        panic!("no stats");
    };
    assert!(
        code == 0 && out.contains("HELLO-FROM-OUTSIDE"),
        "{code} {out}\n{stats:?}"
    );
    let seen = std::fs::read_to_string(&peers).unwrap();
    assert_eq!(seen.lines().last(), Some("198.18.0.2"), "SNAT");

    let mut desired: keel_dataplane::model::DesiredState = serde_json::from_str(&state).unwrap();
    desired.nat.push(keel_dataplane::model::NatRuleSpec {
        router: "r".into(),
        kind: keel_dataplane::model::NatKind::DnatAndSnat,
        external_ip: "198.18.0.50".into(),
        logical_ip: "10.0.1.10".into(),
        protocol: None,
        external_port: None,
        logical_port: None,
        port_min: None,
        port_max: None,
    });
    let r = request(&socket, &Request::Apply { state: desired }).unwrap();
    assert!(matches!(r, Response::Applied { .. }), "{r:?}");
    let out = outside
        .capture(&["ping", "-c", "3", "-W", "2", "198.18.0.50"])
        .unwrap();
    assert!(out.stdout.contains("3 received"), "{out:?}");
    let (code, out) = a
        .exec("nc 198.18.0.1 7000 </dev/null", Duration::from_secs(60))
        .unwrap();
    assert!(code == 0 && out.contains("HELLO"), "{code} {out}");
    let seen = std::fs::read_to_string(&peers).unwrap();
    assert_eq!(seen.lines().last(), Some("198.18.0.50"), "1:1 NAT");
    a.poweroff(Duration::from_secs(60)).unwrap();
}
