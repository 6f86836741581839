//! `vm`: guest-to-guest TCP throughput between two QEMU guests (TCG here)
//! whose virtio-net NICs are keel vhost-user-net ports of an in-process data
//! plane (two subnets joined by the distributed router), against the same
//! two guests on a Linux bridge with TAP devices (QEMU's own virtio-net
//! backend), run side by side. The transfer is busybox `nc` of a file from
//! guest A's tmpfs to guest B's; the time is taken around the sending
//! command. Under TCG both paths are bounded by emulated guest CPU, so the
//! ratio, not the absolute number, is what to quote.
//!
//! Both paths use `vectors=0` (INTx): QEMU 7.2 under TCG crashes starting
//! vhost-user-net with MSI-X, and the peer gets the same interrupt setup.
//! The bridge and TAP devices are created for the run (own names, no
//! address on the host, nothing else attached) and deleted afterwards.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_dataplane::config::ConfigHandle;
use keel_dataplane::counters::Stats;
use keel_dataplane::engine::Worker;
use keel_dataplane::model::{DesiredState, PortSpec, RouterPortSpec, RouterSpec, SwitchSpec};
use keel_testkit::{Guest, GuestConfig};

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "vm",
    about: "Guest-to-guest TCP through keel vhost-user-net + router vs Linux bridge + TAP",
    run,
};

const PEER: &str = "Linux bridge + TAP (QEMU virtio-net backend)";
/// keel offers checksum offload but no TSO; the guest on QEMU's own backend
/// gets TSO/GSO and sends 64 KiB segments. The second peer turns the
/// offloads off to show what segmentation is worth under TCG.
const PEER_PLAIN: &str = "Linux bridge + TAP, QEMU virtio-net without checksum/TSO offloads";
const NO_OFFLOAD: &str = ",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,host_ufo=off,guest_tso4=off,guest_tso6=off,guest_ufo=off";
const MAC_A: &str = "52:54:00:00:01:10";
const MAC_B: &str = "52:54:00:00:02:10";
const TIMEOUT: Duration = Duration::from_secs(900);

fn err(step: &'static str) -> impl FnOnce(keel_testkit::FixtureError) -> BenchError {
    move |e| BenchError::Guest {
        step,
        source: Box::new(e),
    }
}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    let mib = match scale {
        Scale::Quick => 4,
        Scale::Full => 32,
    };
    let keel = through_keel(mib)?;
    let bridge = through_bridge(mib, "")?;
    let bridge_plain = through_bridge(mib, NO_OFFLOAD)?;
    let name = format!("guest→guest TCP, {mib} MiB with nc, routed across two subnets");
    Ok(vec![
        Measurement::new(&name, "MiB/s", true, keel).with_peer(PEER, bridge),
        Measurement::new(
            &format!("{name} (peer without offloads)"),
            "MiB/s",
            true,
            keel,
        )
        .with_peer(PEER_PLAIN, bridge_plain),
    ])
}

fn boot(name: &str, netdev: &[String]) -> Result<Guest, BenchError> {
    Guest::boot(
        GuestConfig::new(name)
            .memory_mib(256)
            .qemu_args(netdev.iter().cloned()),
    )
    .map_err(err("boot guest"))
}

/// Sends `mib` MiB from A to B; returns MiB/s.
fn transfer(a: &mut Guest, b: &mut Guest, dst: &str, mib: u32) -> Result<f64, BenchError> {
    b.run("(sleep 3600 | nc -l -p 5001 > /tmp/recv) >/dev/null 2>&1 & echo started")
        .map_err(err("start receiver"))?;
    a.run(&format!(
        "dd if=/dev/urandom of=/tmp/data bs=1M count={mib} 2>/dev/null"
    ))
    .map_err(err("make data"))?;
    let start = Instant::now();
    let (code, out) = a
        .exec(
            &format!(
                "for i in 1 2 3 4 5; do nc {dst} 5001 < /tmp/data && exit 0; sleep 1; done; exit 1"
            ),
            TIMEOUT,
        )
        .map_err(err("send"))?;
    let secs = start.elapsed().as_secs_f64();
    let (_, size) = b
        .exec(
            "while pidof nc >/dev/null; do sleep 1; done; wc -c < /tmp/recv",
            TIMEOUT,
        )
        .map_err(err("receive"))?;
    let want = u64::from(mib) << 20;
    if code != 0 || size.trim().parse::<u64>().ok() != Some(want) {
        return Err(BenchError::Transfer(format!(
            "sent exit {code} ({out}), received {size:?} of {want} bytes"
        )));
    }
    Ok(f64::from(mib) / secs)
}

fn netdev_vhost(sock: &Path, mac: &str) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=net0,path={}", sock.display()),
        "-netdev".into(),
        "vhost-user,chardev=net0,id=n0".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0"),
    ]
}

fn state() -> DesiredState {
    let switch = |name: &str, subnet: &str| SwitchSpec {
        name: name.into(),
        subnet: subnet.into(),
        vlan: None,
        subnet6: None,
        dhcp: None,
    };
    let port = |name: &str, sw: &str, mac: &str, ip: &str| PortSpec {
        name: name.into(),
        switch: sw.into(),
        interface: name.into(),
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
            port("vm-a", "s1", MAC_A, "10.0.1.10"),
            port("vm-b", "s2", MAC_B, "10.0.2.10"),
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

fn through_keel(mib: u32) -> Result<f64, BenchError> {
    let dir = tempfile::tempdir()?;
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let vhost_err = |e: keel_vhost::net::NetServeError| BenchError::Guest {
        step: "serve vhost-user-net",
        source: Box::new(e),
    };
    let (pa, _server_a) = keel_vhost::net::listen("vm-a", &sa, [0; 6]).map_err(vhost_err)?;
    let (pb, _server_b) = keel_vhost::net::listen("vm-b", &sb, [0; 6]).map_err(vhost_err)?;
    let names = vec!["vm-a".to_string(), "vm-b".to_string()];
    let config = ConfigHandle::new(names.clone());
    config.apply(state()).map_err(|e| BenchError::Guest {
        step: "apply state",
        source: Box::new(e),
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = Worker::new(
        vec![Box::new(pa), Box::new(pb)],
        config.tables(),
        Arc::new(Stats::new(&names)),
    )
    .spawn(Arc::clone(&stop))?;
    let result = (|| {
        let mut a = boot("bench-vnet-a", &netdev_vhost(&sa, MAC_A))?;
        let mut b = boot("bench-vnet-b", &netdev_vhost(&sb, MAC_B))?;
        a.run("ip link set eth0 up && ip addr add 10.0.1.10/24 dev eth0 && ip route add default via 10.0.1.1")
            .map_err(err("address A"))?;
        b.run("ip link set eth0 up && ip addr add 10.0.2.10/24 dev eth0 && ip route add default via 10.0.2.1")
            .map_err(err("address B"))?;
        a.run("ping -c 1 -W 10 10.0.2.10").map_err(err("ping"))?;
        let r = transfer(&mut a, &mut b, "10.0.2.10", mib);
        let _ = a.poweroff(Duration::from_secs(30));
        let _ = b.poweroff(Duration::from_secs(30));
        r
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = worker.join();
    result
}

/// A bridge and two TAP devices, deleted on drop.
struct Bridge {
    names: Vec<String>,
}

impl Bridge {
    fn create() -> Result<Bridge, BenchError> {
        let id = std::process::id() % 100_000;
        let names = vec![format!("kbr{id}"), format!("kta{id}"), format!("ktb{id}")];
        let bridge = Bridge {
            names: names.clone(),
        };
        let ip = |args: &[&str]| {
            keel_testkit::run(&[&["ip"], args].concat()).map_err(err("create bridge and TAPs"))
        };
        ip(&["link", "add", &names[0], "type", "bridge"])?;
        for tap in &names[1..] {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["link", "set", tap, "master", &names[0]])?;
            ip(&["link", "set", tap, "up"])?;
        }
        ip(&["link", "set", &names[0], "up"])?;
        Ok(bridge)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = keel_testkit::run(&["ip", "link", "del", name]);
        }
    }
}

fn through_bridge(mib: u32, device_opts: &str) -> Result<f64, BenchError> {
    let bridge = Bridge::create()?;
    let tap = |name: &str, mac: &str| {
        vec![
            "-netdev".to_string(),
            format!("tap,id=n0,ifname={name},script=no,downscript=no"),
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0{device_opts}"),
        ]
    };
    let mut a = boot("bench-tap-a", &tap(&bridge.names[1], MAC_A))?;
    let mut b = boot("bench-tap-b", &tap(&bridge.names[2], MAC_B))?;
    a.run("ip link set eth0 up && ip addr add 10.0.1.10/24 dev eth0")
        .map_err(err("address A"))?;
    b.run("ip link set eth0 up && ip addr add 10.0.1.11/24 dev eth0")
        .map_err(err("address B"))?;
    a.run("ping -c 1 -W 10 10.0.1.11").map_err(err("ping"))?;
    let r = transfer(&mut a, &mut b, "10.0.1.11", mib);
    let _ = a.poweroff(Duration::from_secs(30));
    let _ = b.poweroff(Duration::from_secs(30));
    r
}
