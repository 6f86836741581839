//! Self-tests of the fixtures: real namespaces, a real QEMU guest, and
//! proof that both clean up after themselves, also when a test panics.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_testkit::guest::{GuestImage, SCRIPT_EXIT};
use keel_testkit::netns::{our_namespaces, sweep_stale, PREFIX};
use keel_testkit::{pid_alive, run, veth_pair, Guest, GuestConfig, NetnsHost};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn two_hosts_ping_each_other_over_veth() {
    let a = NetnsHost::new("pinga").unwrap();
    let b = NetnsHost::new("pingb").unwrap();
    veth_pair(&a, "eth0", &b, "eth0").unwrap();
    a.add_addr("eth0", "198.18.0.1/24").unwrap();
    b.add_addr("eth0", "198.18.0.2/24").unwrap();

    let out = a
        .exec(&["ping", "-c", "2", "-W", "5", "198.18.0.2"])
        .unwrap();
    assert!(out.stdout.contains("2 received"), "{}", out.stdout);
    let out = b
        .exec(&["ping", "-c", "1", "-W", "5", "198.18.0.1"])
        .unwrap();
    assert!(out.stdout.contains("1 received"), "{}", out.stdout);
    // The peer is on a link only the two namespaces share.
    let route = a.sh("ip route get 198.18.0.2").unwrap();
    assert!(route.contains("dev eth0"), "{route}");
}

#[test]
fn routed_hosts_reach_each_other_through_a_router_namespace() {
    let left = NetnsHost::new("left").unwrap();
    let router = NetnsHost::new("router").unwrap();
    let right = NetnsHost::new("right").unwrap();
    veth_pair(&left, "eth0", &router, "l").unwrap();
    veth_pair(&router, "r", &right, "eth0").unwrap();
    left.add_addr("eth0", "198.18.1.2/24").unwrap();
    router.add_addr("l", "198.18.1.1/24").unwrap();
    router.add_addr("r", "198.18.2.1/24").unwrap();
    right.add_addr("eth0", "198.18.2.2/24").unwrap();
    left.add_route("default", "198.18.1.1").unwrap();
    right.add_route("default", "198.18.2.1").unwrap();
    router
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();

    let out = left
        .exec(&["ping", "-c", "1", "-W", "5", "198.18.2.2"])
        .unwrap();
    assert!(out.stdout.contains("1 received"), "{}", out.stdout);
    assert!(
        out.stdout.contains("ttl=63"),
        "one hop through the router: {}",
        out.stdout
    );
}

#[test]
fn failing_command_in_namespace_reports_its_stderr() {
    let host = NetnsHost::new("fail").unwrap();
    let err = host
        .exec(&["ip", "link", "set", "nonexistent0", "up"])
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("nonexistent0"), "{text}");
    let out = host.capture(&["sh", "-c", "exit 3"]).unwrap();
    assert_eq!(out.code, Some(3));
}

#[test]
fn namespace_and_its_processes_are_removed_on_drop() {
    let host = NetnsHost::new("drop").unwrap();
    let name = host.name().to_owned();
    let pid = host.spawn(&["sleep", "600"]).unwrap();
    // A process started behind the fixture's back (not via spawn) is found too.
    host.sh("setsid sleep 600 </dev/null >/dev/null 2>&1 &")
        .unwrap();
    let stray: Vec<u32> = run(&["ip", "netns", "pids", &name])
        .unwrap()
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(stray.len() >= 2, "{stray:?}");
    assert!(our_namespaces().contains(&name));

    drop(host);
    assert!(!our_namespaces().contains(&name));
    assert!(!pid_alive(pid));
    for pid in stray {
        assert!(!pid_alive(pid), "process {pid} survived its namespace");
    }
}

#[test]
fn namespace_is_removed_after_a_panic_in_the_test() {
    let mut name = String::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let a = NetnsHost::new("panica").unwrap();
        let b = NetnsHost::new("panicb").unwrap();
        veth_pair(&a, "eth0", &b, "eth0").unwrap();
        name = a.name().to_owned();
        panic!("test failure with live namespaces");
    }));
    assert!(result.is_err());
    assert!(!name.is_empty());
    assert!(!our_namespaces().contains(&name), "{name} left behind");
}

#[test]
fn stale_namespaces_of_dead_runs_are_swept() {
    // A pid that existed and is gone: what a crashed test run leaves.
    let mut child = Command::new("true").stdout(Stdio::null()).spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    assert!(!pid_alive(dead));
    let stale = format!("{PREFIX}{dead}-0-crashed");
    run(&["ip", "netns", "add", &stale]).unwrap();
    // Ours, alive: must survive the sweep.
    let live = NetnsHost::new("live").unwrap();

    sweep_stale();
    let now = our_namespaces();
    assert!(!now.contains(&stale), "stale namespace not swept: {now:?}");
    assert!(now.contains(&live.name().to_owned()));
}

#[test]
fn guest_boots_runs_commands_and_powers_off() {
    let mut guest =
        Guest::boot(GuestConfig::new("selftest").script("echo script-ran-$((6 * 7))\nexit 5"))
            .unwrap();
    guest.wait_for("script-ran-42", EXIT_TIMEOUT).unwrap();
    guest
        .wait_for(&format!("{SCRIPT_EXIT}5"), EXIT_TIMEOUT)
        .unwrap();

    let image = GuestImage::get().unwrap();
    let release = guest.run("uname -r").unwrap();
    assert_eq!(release.trim(), image.kernel_version);
    let (code, out) = guest
        .exec(
            "echo to-stderr >&2; exit_with() { return $1; }; exit_with 7",
            EXIT_TIMEOUT,
        )
        .unwrap();
    assert_eq!(code, 7);
    assert_eq!(out.trim(), "to-stderr");
    // virtio modules from the image are loaded (the basis of vhost-user tests).
    let modules = guest.run("cat /proc/modules").unwrap();
    for m in ["virtio_pci", "virtio_blk", "virtio_net"] {
        assert!(modules.contains(m), "{m} not loaded: {modules}");
    }
    assert!(
        !guest.console().contains("KEEL_INSMOD_FAILED"),
        "{}",
        guest.console()
    );

    let log = guest.log_path().to_owned();
    let status = guest.poweroff(EXIT_TIMEOUT).unwrap();
    assert!(status.success(), "qemu exit {status:?}");
    let transcript = std::fs::read_to_string(log).unwrap();
    assert!(transcript.contains("script-ran-42"));
}

#[test]
fn guest_is_killed_after_a_panic_in_the_test() {
    let mut pid = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let guest = Guest::boot(GuestConfig::new("panic")).unwrap();
        pid = guest.pid();
        assert!(pid_alive(pid));
        panic!("test failure with a live guest");
    }));
    assert!(result.is_err());
    assert_ne!(pid, 0);
    assert!(!pid_alive(pid), "qemu {pid} survived the panic");
}

#[test]
fn guest_sees_a_vhost_user_blk_disk_in_shared_memory() {
    // qemu-storage-daemon as the vhost-user backend proves the guest's
    // memfd memory can be mapped by another process: what keel's own
    // backends rely on.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("vhost.sock");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let blockdev = format!("driver=file,node-name=f,filename={}", img.display());
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
        sock.display()
    );
    let mut daemon = Command::new("qemu-storage-daemon")
        .args(["--blockdev", &blockdev, "--export", &export])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Kill(&mut daemon);
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        sock.exists(),
        "qemu-storage-daemon did not create its socket"
    );

    let chardev = format!("socket,id=vub,path={}", sock.display());
    let config = GuestConfig::new("vublk").qemu_args([
        "-chardev",
        &chardev,
        "-device",
        "vhost-user-blk-pci,chardev=vub",
    ]);
    let mut guest = Guest::boot(config).unwrap();
    let size = guest.run("cat /sys/block/vda/size").unwrap();
    assert_eq!(size.trim(), "16384", "8 MiB in 512-byte sectors");
    guest
        .run("echo keel-was-here | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null")
        .unwrap();
    guest.poweroff(EXIT_TIMEOUT).unwrap();

    let data = std::fs::read(&img).unwrap();
    assert_eq!(&data[512..526], b"keel-was-here\n");
}
