//! Two real QEMU guests (TCG, memfd shared memory) with virtio-net NICs on
//! keel's vhost-user-net backend, plugged as ports into keel's data plane
//! (in-process worker), on two subnets joined by the distributed router:
//! both get their address from keel's DHCP (busybox udhcpc), ping across
//! the router and move 4 MiB with nc, checked by md5.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use keel_dataplane::config::ConfigHandle;
use keel_dataplane::counters::Stats;
use keel_dataplane::engine::Worker;
use keel_dataplane::model::{
    DesiredState, DhcpSpec, PortSpec, RouterPortSpec, RouterSpec, SwitchSpec,
};
use keel_dataplane::port::Port;
use keel_testkit::{Guest, GuestConfig};
use keel_vhost::net::{listen, NetServer};

const MAC_A: &str = "52:54:00:00:01:10";
const MAC_B: &str = "52:54:00:00:02:10";
/// Generous: 4 MiB under TCG with other builds on the machine.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// A data plane with one vhost-user-net port per VM; stopped on drop.
struct DataPlane {
    stop: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
    stats: Arc<Stats>,
    _servers: Vec<NetServer>,
}

impl DataPlane {
    fn start(socks: &[(&str, &Path)], state: DesiredState) -> DataPlane {
        let mut ports: Vec<Box<dyn Port>> = Vec::new();
        let mut servers = Vec::new();
        for (name, sock) in socks {
            let (port, server) = listen(name, sock, [0; 6]).unwrap();
            ports.push(Box::new(port));
            servers.push(server);
        }
        let names: Vec<String> = socks.iter().map(|(n, _)| n.to_string()).collect();
        let config = ConfigHandle::new(names.clone());
        config.apply(state).unwrap();
        let stats = Arc::new(Stats::new(&names));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker::new(ports, config.tables(), Arc::clone(&stats))
            .spawn(Arc::clone(&stop))
            .unwrap();
        DataPlane {
            stop,
            worker: Some(worker),
            stats,
            _servers: servers,
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn two_subnets() -> DesiredState {
    let switch = |name: &str, subnet: &str| SwitchSpec {
        name: name.into(),
        subnet: subnet.into(),
        vlan: None,
        subnet6: None,
        dhcp: Some(DhcpSpec::default()),
    };
    let port = |name: &str, sw: &str, iface: &str, mac: &str, ip: &str| PortSpec {
        name: name.into(),
        switch: sw.into(),
        interface: iface.into(),
        mac: Some(mac.into()),
        ips: vec![ip.into()],
        port_security: true,
    };
    let gw = |sw: &str, mac: &str, ip: &str| RouterPortSpec {
        switch: sw.into(),
        mac: mac.into(),
        ip: ip.into(),
        ip6: None,
    };
    DesiredState {
        switches: vec![switch("s1", "10.0.1.0/24"), switch("s2", "10.0.2.0/24")],
        ports: vec![
            port("vm-a", "s1", "vm-a", MAC_A, "10.0.1.10"),
            port("vm-b", "s2", "vm-b", MAC_B, "10.0.2.10"),
        ],
        routers: vec![RouterSpec {
            name: "r1".into(),
            ports: vec![
                gw("s1", "02:00:00:00:01:01", "10.0.1.1"),
                gw("s2", "02:00:00:00:02:01", "10.0.2.1"),
            ],
            static_routes: vec![],
        }],
        ..DesiredState::default()
    }
}

fn boot(name: &str, sock: &Path, mac: &str) -> Guest {
    Guest::boot(GuestConfig::new(name).memory_mib(256).qemu_args([
        "-chardev".to_string(),
        format!("socket,id=net0,path={}", sock.display()),
        "-netdev".into(),
        "vhost-user,chardev=net0,id=n0".into(),
        "-device".into(),
        // vectors=0 (INTx): QEMU 7.2 under TCG segfaults in
        // msix_set_vector_notifiers when vhost-user-net starts with MSI-X.
        format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0"),
    ]))
    .unwrap()
}

/// Gets the guest's address from keel's DHCP server with busybox udhcpc
/// (its event script applies the lease); returns what the lease said.
fn dhcp(guest: &mut Guest) -> String {
    guest
        .run(concat!(
            "mkdir -p /etc/udhcpc && cat > /etc/udhcpc/keel.sh <<'EOF'\n",
            "#!/bin/sh\n",
            "case \"$1\" in\n",
            "  bound|renew)\n",
            "    ip addr flush dev \"$interface\"\n",
            "    ip addr add \"$ip/$mask\" dev \"$interface\"\n",
            "    ip route replace default via \"$router\"\n",
            "    echo \"lease ip=$ip mask=$mask router=$router\" > /tmp/lease ;;\n",
            "esac\n",
            "EOF\n",
            "chmod +x /etc/udhcpc/keel.sh && ip link set eth0 up"
        ))
        .unwrap();
    guest
        .run("udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /etc/udhcpc/keel.sh >/dev/null 2>&1; cat /tmp/lease")
        .unwrap()
}

#[test]
fn guests_ping_and_transfer_across_router() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (sock_a, sock_b) = (dir.path().join("vm-a.sock"), dir.path().join("vm-b.sock"));
    let dp = DataPlane::start(&[("vm-a", &sock_a), ("vm-b", &sock_b)], two_subnets());
    let mut a = boot("vnet-a", &sock_a, MAC_A);
    let mut b = boot("vnet-b", &sock_b, MAC_B);
    // The guest driver negotiated checksum offload (bit 0: partial checksums
    // the backend completes) and mergeable RX buffers (bit 15).
    let features = a.run("cat /sys/class/net/eth0/device/features").unwrap();
    let bit = |n: usize| features.trim().as_bytes().get(n).copied();
    assert_eq!((bit(0), bit(15)), (Some(b'1'), Some(b'1')), "{features}");
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

    // The router's gateway answers, then guest B across the router.
    a.run("ping -c 3 -W 5 10.0.1.1").unwrap();
    let out = a.run("ping -c 3 -W 5 10.0.2.10").unwrap();
    assert!(out.contains("3 packets received"), "{out}");

    // A few MiB through the router, checked end to end. busybox nc exits
    // when either side reaches EOF, so the listener's stdin stays open.
    b.run("(sleep 3600 | nc -l -p 5001 > /tmp/recv) >/dev/null 2>&1 & echo started")
        .unwrap();
    a.run("dd if=/dev/urandom of=/tmp/data bs=1024 count=4096 2>/dev/null")
        .unwrap();
    let sent = a.run("md5sum < /tmp/data").unwrap();
    let (code, out) = a
        .exec(
            "for i in 1 2 3 4 5; do nc 10.0.2.10 5001 < /tmp/data && exit 0; sleep 1; done; exit 1",
            TRANSFER_TIMEOUT,
        )
        .unwrap();
    assert_eq!(code, 0, "transfer failed: {out}");
    let (code, received) = b
        .exec(
            "while pidof nc >/dev/null; do sleep 1; done; md5sum < /tmp/recv",
            TRANSFER_TIMEOUT,
        )
        .unwrap();
    assert_eq!(code, 0, "{received}");
    assert_eq!(
        sent.split_whitespace().next(),
        received.split_whitespace().next(),
        "checksums differ"
    );
    let snap = dp.stats.snapshot();
    assert!(snap.outcomes["dhcp_ack_sent"] >= 2, "{snap:?}");
    // 4 MiB in MTU-sized segments, all through the router.
    assert!(snap.outcomes["routed"] > (4 << 20) / 1500, "{snap:?}");
    a.poweroff(Duration::from_secs(60)).unwrap();
    b.poweroff(Duration::from_secs(60)).unwrap();
}

#[test]
fn guest_nic_survives_a_backend_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm-a.sock");
    let dp = DataPlane::start(&[("vm-a", &sock)], two_subnets_one_port());
    // reconnect=1: QEMU redials the socket when the backend goes away.
    let mut a = Guest::boot(GuestConfig::new("vnet-restart").memory_mib(256).qemu_args([
        "-chardev".to_string(),
        format!("socket,id=net0,path={},reconnect=1", sock.display()),
        "-netdev".into(),
        "vhost-user,chardev=net0,id=n0".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={MAC_A},vectors=0"),
    ]))
    .unwrap();
    let lease = dhcp(&mut a);
    assert!(lease.contains("ip=10.0.1.10"), "{lease}");
    a.run("ping -c 2 -W 5 10.0.1.1").unwrap();

    // The data plane and its vhost-user server go away and come back.
    drop(dp);
    let dp = DataPlane::start(&[("vm-a", &sock)], two_subnets_one_port());
    let (code, out) = a
        .exec(
            "for i in $(seq 1 30); do ping -c 1 -W 2 10.0.1.1 && exit 0; done; exit 1",
            TRANSFER_TIMEOUT,
        )
        .unwrap();
    assert_eq!(code, 0, "no traffic after the backend restart: {out}");
    assert!(dp.stats.snapshot().outcomes["router_echo_replied"] >= 1);
    a.poweroff(Duration::from_secs(60)).unwrap();
}

/// [`two_subnets`] with only guest A's port (the data plane has one interface).
fn two_subnets_one_port() -> DesiredState {
    let mut s = two_subnets();
    s.ports.retain(|p| p.interface == "vm-a");
    s
}
