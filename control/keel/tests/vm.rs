//! VMs end to end through the real `keel up`: an operator uploads a
//! bootable disk image over the API, makes a volume of it and a VM, and the
//! VM boots under libvirt/QEMU (UEFI) from keel's vhost-user-blk backend.
//! Then its lifecycle: data kept across a reboot, pause/resume, a QEMU
//! killed outside keel reported STOPPED, illegal actions refused with the
//! allowed states, and delete leaving no process, domain or file behind.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_testkit::{
    guest_disk_image, guest_disk_image_with, root_veth, serve_greeting, Accel, BootLoader,
    KeelProcess, NetnsHost,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const TASK_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest writes a marker to its data partition on first boot and
/// reports it on every later boot.
const SCRIPT: &str = r#"
if dd if=/dev/vda2 bs=512 count=1 2>/dev/null | grep -q KEEL-DATA; then
  echo "KEEL-FOUND $(dd if=/dev/vda2 bs=16 count=1 2>/dev/null)"
else
  echo KEEL-DATA-7 | dd of=/dev/vda2 conv=fsync 2>/dev/null && echo KEEL-WROTE
fi
if ip link show eth0 >/dev/null 2>&1; then
  mkdir -p /etc/udhcpc
  printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"; ip route replace default via "$router"; echo "KEEL-LEASE ip=$ip router=$router";; esac\n' > /etc/udhcpc/keel.sh
  chmod +x /etc/udhcpc/keel.sh
  ip link set eth0 up
  udhcpc -i eth0 -f -q -n -t 60 -T 2 -s /etc/udhcpc/keel.sh 2>/dev/null
fi
echo KEEL-BOOTED
"#;

struct Api {
    base: String,
    token: String,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.send(method, path, &[], body)
    }

    /// DELETE guarded by If-Match with the revision of `read` (the resource
    /// as last read).
    fn delete_read(&self, path: &str, read: &Value) -> (u16, Value) {
        let etag = format!("\"{}\"", read["revision"]);
        self.send("DELETE", path, &[("If-Match", &etag)], None)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = ureq::request(method, &url)
            .timeout(Duration::from_secs(60))
            .set("authorization", &format!("Bearer {}", self.token));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let response = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        (
            response.status(),
            response.into_json().unwrap_or(Value::Null),
        )
    }

    /// PATCH at the revision just read (If-Match); must succeed.
    fn patch(&self, path: &str, body: Value) -> Value {
        self.at_revision("PATCH", path, Some(body))
    }

    /// `method` at the revision just read (If-Match); must succeed.
    fn at_revision(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let current = self.ok("GET", path, None);
        let etag = format!("\"{}\"", current["revision"]);
        let (status, value) = self.send(method, path, &[("If-Match", &etag)], body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {value}"
        );
        value
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {value}"
        );
        value
    }

    fn upload(&self, image_id: &str, bytes: &[u8]) {
        let total = bytes.len();
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            let start = i * CHUNK;
            let end = start + chunk.len() - 1;
            let r = ureq::put(&format!("{}/api/v1/images/{image_id}/file", self.base))
                .timeout(Duration::from_secs(60))
                .set("authorization", &format!("Bearer {}", self.token))
                .set("content-range", &format!("bytes {start}-{end}/{total}"))
                .send_bytes(chunk);
            if let Err(e) = r {
                panic!("chunk {i}: {e:?}");
            }
        }
    }

    /// Waits for a task to finish and returns it; panics if it failed.
    fn wait_task(&self, task: &Value) -> Value {
        let id = task["id"].as_str().unwrap();
        let start = Instant::now();
        loop {
            let t = self.ok("GET", &format!("/api/v1/tasks/{id}"), None);
            match t["state"].as_str().unwrap() {
                "SUCCEEDED" => return t,
                "FAILED" => panic!("task {} failed: {}", t["action"], t["message"]),
                _ => {}
            }
            assert!(start.elapsed() < TASK_TIMEOUT, "task {t} did not finish");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// POSTs an action at `path` (no body) and waits for its task.
    fn run_action(&self, path: &str) -> Value {
        let (status, task) = self.call("POST", path, None);
        assert_eq!(status, 202, "{path}: {task}");
        self.wait_task(&task)
    }

    fn action(&self, vm: &str, action: &str) -> Value {
        self.run_action(&format!("/api/v1/vms/{vm}/actions/{action}"))
    }

    fn vm_status(&self, vm: &str) -> (String, String) {
        let v = self.ok("GET", &format!("/api/v1/vms/{vm}"), None);
        (
            v["status"].as_str().unwrap().to_owned(),
            v["status_reason"].as_str().unwrap_or("").to_owned(),
        )
    }

    fn wait_status(&self, vm: &str, want: &str) -> String {
        let start = Instant::now();
        loop {
            let (status, reason) = self.vm_status(vm);
            if status == want {
                return reason;
            }
            assert!(
                start.elapsed() < TASK_TIMEOUT,
                "VM stayed {status}, wanted {want}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Occurrences of `marker` in the VM's console log.
fn console_count(state: &Path, vm: &str, marker: &str) -> usize {
    std::fs::read_to_string(state.join("vms").join(vm).join("console.log"))
        .unwrap_or_default()
        .matches(marker)
        .count()
}

fn wait_console(state: &Path, vm: &str, marker: &str, count: usize) {
    let start = Instant::now();
    while console_count(state, vm, marker) < count {
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "no {marker} #{count} on the console; log:\n{}",
            std::fs::read_to_string(state.join("vms").join(vm).join("console.log"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn qemu_pid(vm: &str) -> Option<i32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("guest=keel-{vm}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
}

fn virsh_has_domain(vm: &str) -> bool {
    Command::new("virsh")
        .args(["-c", "qemu:///system", "dominfo", &format!("keel-{vm}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Opens the console WebSocket, sends `input`, and reads binary frames
/// until `want` and the end of its line have arrived; returns everything read.
fn console_read_until(url: &str, input: Option<&[u8]>, want: &[u8]) -> Vec<u8> {
    let (mut ws, _) = tungstenite::connect(url).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    if let Some(bytes) = input {
        ws.send(tungstenite::Message::binary(bytes.to_vec()))
            .unwrap();
    }
    let start = Instant::now();
    let mut seen = Vec::new();
    // `want` and the rest of its line: a frame may end right after `want`.
    let complete = |seen: &[u8]| {
        seen.windows(want.len())
            .position(|w| w == want)
            .is_some_and(|at| seen[at..].contains(&b'\n'))
    };
    while !complete(&seen) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "never got {:?}; got {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&seen)
        );
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => seen.extend_from_slice(&b),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("console closed: {e}"),
        }
    }
    let _ = ws.close(None);
    seen
}

/// Whether `needle` occurs in the file.
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
}

/// Logs in as the admin of a `keel up` on its state directory.
fn login(keel: &KeelProcess, state: &Path) -> Api {
    let password = std::fs::read_to_string(state.join("admin-password")).unwrap();
    let r = ureq::post(&keel.url("/api/v1/auth/login"))
        .send_json(json!({"username": "admin", "password": password.trim()}));
    let login: Value = match r {
        Ok(r) => r.into_json().unwrap(),
        Err(e) => panic!("login: {e}"),
    };
    Api {
        base: keel.url(""),
        token: login["access_token"].as_str().unwrap().to_owned(),
    }
}

/// A hang guard counted in polls, not a speed check: it only ends a test
/// whose awaited state never comes (the agent's loop is dead), instead of
/// blocking CI.
const HANG_GUARD_POLLS: usize = 2400;

/// Calls `probe` (every 250 ms) until it yields a value; fails with `what`
/// and the last probe's note only if that never happens within the guard.
fn eventually<T>(what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let mut last = String::new();
    for _ in 0..HANG_GUARD_POLLS {
        match probe() {
            Ok(v) => return v,
            Err(note) => last = note,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{what} never happened: {last}")
}

/// The desired state the agent last gave the data plane (`Null` before).
fn applied(state: &Path) -> Value {
    std::fs::read_to_string(state.join("run").join("dataplane.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Polls `path` until `done` holds for it; returns it.
fn wait_for(api: &Api, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    eventually(what, || {
        let v = api.ok("GET", path, None);
        if done(&v) {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
}

/// Disaster recovery of the running VM through the APIs of two keels: the
/// protected site's protection group replicates the VM's disk to a replica
/// group of a second `keel up` (the DR site, on loopback), paired with the
/// credentials the first hands out. QEMU reconnects to the group's CDP
/// source (same disk serial), which copies the disk in full and then ships
/// the guest's writes every RPO. Stopping protection gives the disk back to
/// its own backend while the guest runs on; failover at the DR site
/// promotes the replica and boots the VM there, with the guest's data.
fn protect_and_replicate(
    api: &Api,
    work: &Path,
    state: &Path,
    accel: &str,
    vdc_id: &str,
    vm: &str,
    volume_id: &str,
) {
    let base = api.base.as_str();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let body = |extra: Value| {
        let mut b = json!({"name": "dr", "vdc_id": vdc_id, "rpo_seconds": 1,
            "replica_address": address, "members": [{"vm_id": vm, "boot_priority": 1}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (bad, field) in [
        (json!({"mode": "semi-sync"}), "mode"),
        (
            json!({"mode": "sync", "sync_timeout_seconds": 0}),
            "sync_timeout_seconds",
        ),
        (json!({"rpo_seconds": 0}), "rpo_seconds"),
        (json!({"replica_address": "dr-site"}), "replica_address"),
        (json!({"members": []}), "members"),
        (
            json!({"members": [{"vm_id": "no-such-vm"}]}),
            "members[0].vm_id",
        ),
    ] {
        let (status, problem) = api.call("POST", "/api/v1/protection-groups", Some(body(bad)));
        assert_eq!(status, 422, "{problem}");
        assert_eq!(problem["field"], field, "{problem}");
    }
    let group = api.ok(
        "POST",
        "/api/v1/protection-groups",
        Some(body(json!({"mode": "sync", "sync_timeout_seconds": 60}))),
    );
    assert_eq!(group["status"], "UNPROTECTED", "{group}");
    assert_eq!(group["mode"], "sync", "{group}");
    let gid = group["id"].as_str().unwrap().to_owned();
    let (status, problem) = api.call(
        "POST",
        "/api/v1/protection-groups",
        Some(body(json!({"name": "dr2"}))),
    );
    assert_eq!(status, 409, "a VM is in one group only: {problem}");

    // The pairing: credentials the host agent made, and the VM to recover.
    let pairing = eventually("replica credentials", || {
        let (status, c) = api.call(
            "GET",
            &format!("/api/v1/protection-groups/{gid}/replica-credentials"),
            None,
        );
        if status == 200 {
            return Ok(c);
        }
        assert_eq!(status, 409, "{c}");
        Err(c.to_string())
    });
    assert_eq!(pairing["vms"][0]["vm_id"], vm, "{pairing}");
    assert_eq!(pairing["vms"][0]["disks"][0]["volume_id"], volume_id);

    // The connectivity check: nothing listens at the DR address yet.
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/protection-groups/{gid}/actions/start"),
        None,
    );
    assert_eq!(status, 202, "{task}");
    let failed = eventually("the start to fail", || {
        let t = api.ok(
            "GET",
            &format!("/api/v1/tasks/{}", task["id"].as_str().unwrap()),
            None,
        );
        match t["state"].as_str() {
            Some("FAILED") => Ok(t),
            _ => Err(t.to_string()),
        }
    });
    assert!(
        failed["message"].as_str().unwrap().contains("unreachable"),
        "{failed}"
    );
    let g = api.ok("GET", &format!("/api/v1/protection-groups/{gid}"), None);
    assert_eq!(g["status"], "UNPROTECTED", "{g}");
    assert_eq!(g["protecting"], false, "{g}");
    assert!(
        g["status_reason"].as_str().unwrap().contains("unreachable"),
        "{g}"
    );

    // The DR site: a second keel, its replica group paired with the first.
    let dr_state = work.join("dr-site");
    let dr_keel =
        KeelProcess::up_with(&dr_state, &["--accel", accel, "--vm-shutdown-timeout", "5"]).unwrap();
    let dr = login(&dr_keel, &dr_state);
    let dr_vdc = dr.ok("POST", "/api/v1/vdcs", Some(json!({"name": "recovered"})));
    let dr_vdc = dr_vdc["id"].as_str().unwrap();
    let mut broken = pairing.clone();
    broken["credentials"]["key_pem"] = json!("not a key");
    let (status, problem) = dr.call(
        "POST",
        "/api/v1/replica-groups",
        Some(json!({"name": "from-a", "vdc_id": dr_vdc, "listen_address": address, "pairing": broken})),
    );
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "pairing.credentials.key_pem", "{problem}");

    // Network mapping: the recovered NIC goes to a subnet of the DR site.
    // (This VM has no NIC; its pairing is given the one a VM with a port
    // on a primary subnet carries.)
    let dr_vpc = dr.ok(
        "POST",
        "/api/v1/vpcs",
        Some(json!({"name": "dr-vpc", "vdc_id": dr_vdc})),
    );
    let dr_subnet = dr.ok(
        "POST",
        "/api/v1/subnets",
        Some(json!({"name": "dr-a", "vpc_id": dr_vpc["id"], "cidr": "10.77.0.0/24"})),
    );
    let dr_subnet = dr_subnet["id"].as_str().unwrap().to_owned();
    let mut pairing = pairing;
    pairing["vms"][0]["nics"] = json!([{"subnet_id": "primary-subnet", "fixed_ip": "10.77.0.20"}]);
    let rg_body = |maps: Value| {
        json!({"name": "from-a", "vdc_id": dr_vdc, "listen_address": address,
            "pairing": pairing, "network_mappings": maps})
    };
    for (maps, field) in [
        (json!([]), "network_mappings"),
        (
            json!([{"source_subnet_id": "primary-subnet", "subnet_id": "no-such-subnet"}]),
            "network_mappings[0].subnet_id",
        ),
        (
            json!([{"source_subnet_id": "elsewhere", "subnet_id": dr_subnet}]),
            "network_mappings[0].source_subnet_id",
        ),
    ] {
        let (status, problem) = dr.call("POST", "/api/v1/replica-groups", Some(rg_body(maps)));
        assert_eq!(status, 422, "{problem}");
        assert_eq!(problem["field"], field, "{problem}");
    }
    let rg = dr.ok(
        "POST",
        "/api/v1/replica-groups",
        Some(rg_body(
            json!([{"source_subnet_id": "primary-subnet", "subnet_id": dr_subnet}]),
        )),
    );
    let rg_path = format!("/api/v1/replica-groups/{}", rg["id"].as_str().unwrap());
    wait_for(&dr, &rg_path, "replica never listened", |g| {
        g["status"] == "RECEIVING"
    });

    let serial_before = guest_run(api, base, vm, "P0", "cat /sys/block/vda/serial; echo");
    api.run_action(&format!("/api/v1/protection-groups/{gid}/actions/start"));
    let g = api.ok("GET", &format!("/api/v1/protection-groups/{gid}"), None);
    assert_eq!(g["status"], "PROTECTING", "{g}");
    let (status, problem) = api.call(
        "POST",
        &format!("/api/v1/vms/{vm}/volumes"),
        Some(json!({"volume_id": volume_id})),
    );
    assert_eq!(status, 409, "no disk changes while protected: {problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("protection group"),
        "{problem}"
    );
    let (status, problem) = api.delete_read(&format!("/api/v1/protection-groups/{gid}"), &g);
    assert_eq!(status, 409, "a protecting group is not deleted: {problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("stop protection"),
        "{problem}"
    );

    // The guest writes through the CDP source (same disk serial); the
    // replica has it within the RPO once the full copy is done.
    let out = guest_run(
        api,
        base,
        vm,
        "P1",
        "dd if=/dev/urandom of=/tmp/p bs=4096 count=64 2>/dev/null; \
         dd if=/tmp/p of=/dev/vda2 bs=4096 seek=256 conv=fsync 2>/dev/null; \
         echo KEEL-CDP-MARK-3 | dd of=/dev/vda2 bs=4096 seek=320 conv=fsync 2>/dev/null; \
         cat /sys/block/vda/serial; echo; \
         echo PATTERN=$(dd if=/dev/vda2 bs=4096 skip=256 count=64 2>/dev/null | md5sum)",
    );
    assert!(out.contains("P1=0"), "{out}");
    let serial = |out: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.len() == 20 && l.chars().all(|c| c.is_ascii_hexdigit()))
            .map(str::to_owned)
    };
    assert!(serial(&out).is_some(), "{out}");
    assert_eq!(
        serial(&out),
        serial(&serial_before),
        "{out} / {serial_before}"
    );
    let pattern = |out: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix("PATTERN="))
            .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
            .unwrap()
    };
    let written = pattern(&out);
    let replica_disk = dr_state
        .join("cdp-replicas")
        .join(rg["id"].as_str().unwrap())
        .join("replica")
        .join("disk-0.raw");
    let g = wait_for(
        api,
        &format!("/api/v1/protection-groups/{gid}"),
        "replica never caught up",
        |g| {
            let o = &g["observed"];
            // A reconnect while the replica starts up says so for a moment.
            g["status_reason"] == ""
                && o["resyncing"] == false
                && o["dirty_chunks"] == 0
                && o["last_acked_seq"].as_u64() >= o["last_sealed_seq"].as_u64()
                && file_contains(&replica_disk, b"KEEL-CDP-MARK-3")
        },
    );
    assert_eq!(g["status"], "PROTECTING", "{g}");
    assert_eq!(g["status_reason"], "", "{g}");
    assert!(g["observed"]["lag_seconds"].as_f64().unwrap() >= 0.0, "{g}");
    let rgv = wait_for(&dr, &rg_path, "replica status", |g| {
        g["observed"]["consistent"] == true
            && !g["observed"]["recovery_points"]
                .as_array()
                .unwrap()
                .is_empty()
    });
    assert!(
        rgv["observed"]["segments_applied"].as_u64().unwrap() >= 2,
        "{rgv}"
    );

    // Synchronous mode: once the guest's write returned, the DR site has
    // it (no waiting here).
    let g = wait_for(
        api,
        &format!("/api/v1/protection-groups/{gid}"),
        "synchronous replication never engaged",
        |g| g["observed"]["replication"] == "sync",
    );
    assert_eq!(g["observed"]["sync_fallbacks"], 0, "{g}");
    let out = guest_run(
        api,
        base,
        vm,
        "P1S",
        "echo KEEL-CDP-SYNC-MARK | dd of=/dev/vda2 bs=4096 seek=330 oflag=direct 2>/dev/null",
    );
    assert!(out.contains("P1S=0"), "{out}");
    assert!(
        file_contains(&replica_disk, b"KEEL-CDP-SYNC-MARK"),
        "a write the guest saw complete is on the DR site"
    );

    // Planned switchover: a write just before the stop still reaches the
    // replica (the source drains before it exits); the disk goes back to
    // its own backend and the guest goes on.
    let out = guest_run(
        api,
        base,
        vm,
        "P3",
        "echo KEEL-CDP-LAST-4 | dd of=/dev/vda2 bs=4096 seek=330 conv=fsync 2>/dev/null",
    );
    assert!(out.contains("P3=0"), "{out}");
    api.run_action(&format!("/api/v1/protection-groups/{gid}/actions/stop"));
    let out = guest_run(
        api,
        base,
        vm,
        "P2",
        "dd if=/dev/vda2 bs=4096 skip=320 count=1 2>/dev/null | head -c 15; echo",
    );
    assert!(out.contains("KEEL-CDP-MARK-3"), "{out}");
    let g = api.ok("GET", &format!("/api/v1/protection-groups/{gid}"), None);
    assert_eq!(g["status"], "UNPROTECTED", "{g}");
    assert_eq!(g["status_reason"], "", "{g}");
    assert_eq!(
        g["observed"]["last_acked_seq"], g["observed"]["last_sealed_seq"],
        "drained: {g}"
    );

    // Failover at the DR site: an unknown recovery point is refused; the
    // latest one becomes a volume and the VM boots there with the data.
    let (status, problem) = dr.call(
        "POST",
        &format!("{rg_path}/actions/failover"),
        Some(json!({"recovery_point": 999_999})),
    );
    assert_eq!(status, 422, "{problem}");
    let (status, task) = dr.call(
        "POST",
        &format!("{rg_path}/actions/failover"),
        Some(json!({})),
    );
    assert_eq!(status, 202, "{task}");
    dr.wait_task(&task);
    let rgv = dr.ok("GET", &rg_path, None);
    assert_eq!(rgv["status"], "FAILED_OVER", "{rgv}");
    let dr_vm = rgv["failover"]["vm_ids"][0].as_str().unwrap().to_owned();
    let _dr_guard = DomainGuard(dr_vm.clone());
    assert_eq!(dr.vm_status(&dr_vm).0, "RUNNING");
    wait_console(&dr_state, &dr_vm, "KEEL-BOOTED", 1);
    assert!(
        console_count(&dr_state, &dr_vm, "KEEL-FOUND KEEL-DATA-7") >= 1,
        "the recovered VM finds the data written at the protected site"
    );
    let out = guest_run(
        &dr,
        &dr.base,
        &dr_vm,
        "R1",
        "dd if=/dev/vda2 bs=4096 skip=320 count=1 2>/dev/null | head -c 15; echo; \
         dd if=/dev/vda2 bs=4096 skip=330 count=1 2>/dev/null | head -c 15; echo; \
         echo NICS=$(ls /sys/class/net | tr '\n' ' '); \
         echo PATTERN=$(dd if=/dev/vda2 bs=4096 skip=256 count=64 2>/dev/null | md5sum)",
    );
    assert!(
        out.contains("NICS=") && out.contains("eth0"),
        "the mapped NIC: {out}"
    );
    let v = dr.ok("GET", &format!("/api/v1/vms/{dr_vm}"), None);
    let port = dr.ok(
        "GET",
        &format!("/api/v1/ports/{}", v["port_ids"][0].as_str().unwrap()),
        None,
    );
    assert_eq!(port["subnet_id"], dr_subnet.as_str(), "{port}");
    assert_eq!(port["fixed_ip"], "10.77.0.20", "the address it had: {port}");
    assert!(out.contains("KEEL-CDP-MARK-3"), "{out}");
    assert!(
        out.contains("KEEL-CDP-LAST-4"),
        "written just before the switchover: {out}"
    );
    assert_eq!(pattern(&out), written, "{out}");

    reprotect_and_fail_back(api, &dr, vdc_id, dr_vdc, vm, volume_id, &dr_vm, state);

    // Clean up both sites through their APIs.
    let v = dr.ok("GET", &format!("/api/v1/vms/{dr_vm}"), None);
    let (status, task) = dr.send(
        "DELETE",
        &format!("/api/v1/vms/{dr_vm}?delete_volumes=true"),
        &[],
        None,
    );
    assert_eq!(status, 202, "{task} {v}");
    dr.wait_task(&task);
    let rgv = dr.ok("GET", &rg_path, None);
    let (status, problem) = dr.delete_read(&rg_path, &rgv);
    assert_eq!(status, 204, "{problem}");
    let (status, problem) = api.delete_read(&format!("/api/v1/protection-groups/{gid}"), &g);
    assert_eq!(status, 204, "{problem}");
    eventually("removal of both groups' data", || {
        if state.join("cdp").join(&gid).exists() || replica_disk.exists() {
            Err("journal or replica directory still there".into())
        } else {
            Ok(())
        }
    });
}

/// Reprotect: the VM recovered at the DR site is protected back to the
/// primary, where a replica group receives into the original VM's own
/// volume (the VM stopped meanwhile). Failback: the DR VM shuts down, its
/// protection stops (drains), and failover at the primary starts the
/// original VM on its volume, with what was written at the DR site.
#[allow(clippy::too_many_arguments)]
fn reprotect_and_fail_back(
    api: &Api,
    dr: &Api,
    vdc_id: &str,
    dr_vdc: &str,
    vm: &str,
    volume_id: &str,
    dr_vm: &str,
    state: &Path,
) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    api.action(vm, "force-stop");
    let back = dr.ok(
        "POST",
        "/api/v1/protection-groups",
        Some(json!({"name": "back", "vdc_id": dr_vdc, "rpo_seconds": 1,
            "replica_address": address, "members": [{"vm_id": dr_vm, "boot_priority": 1}]})),
    );
    let back_id = back["id"].as_str().unwrap().to_owned();
    let pairing = eventually("replica credentials of the reverse group", || {
        let (status, c) = dr.call(
            "GET",
            &format!("/api/v1/protection-groups/{back_id}/replica-credentials"),
            None,
        );
        if status == 200 {
            return Ok(c);
        }
        Err(c.to_string())
    });
    assert_eq!(
        pairing["vms"][0]["origin_vm_id"], vm,
        "the DR VM knows where it came from: {pairing}"
    );
    assert_eq!(
        pairing["vms"][0]["nics"][0]["fixed_ip"], "10.77.0.20",
        "its NIC goes with it: {pairing}"
    );
    let mut fresh = pairing.clone();
    fresh["vms"][0]
        .as_object_mut()
        .unwrap()
        .remove("origin_vm_id");
    let (status, problem) = api.call(
        "POST",
        "/api/v1/replica-groups",
        Some(
            json!({"name": "x", "vdc_id": vdc_id, "listen_address": address,
            "pairing": fresh, "adopt_volumes": true}),
        ),
    );
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "pairing.vms[0].origin_vm_id", "{problem}");
    let rg = api.ok(
        "POST",
        "/api/v1/replica-groups",
        Some(
            json!({"name": "back-from-dr", "vdc_id": vdc_id, "listen_address": address,
            "pairing": pairing, "adopt_volumes": true}),
        ),
    );
    assert_eq!(rg["adopted"]["vm_ids"][0], vm, "{rg}");
    assert_eq!(rg["adopted"]["volume_ids"][0], volume_id, "{rg}");
    let rg_path = format!("/api/v1/replica-groups/{}", rg["id"].as_str().unwrap());
    let (status, problem) = api.call("POST", &format!("/api/v1/vms/{vm}/actions/start"), None);
    assert_eq!(
        status, 409,
        "its volume receives the DR site's data: {problem}"
    );
    wait_for(api, &rg_path, "reverse replica never listened", |g| {
        g["status"] == "RECEIVING"
    });
    // Written at the DR site while nothing protected it: the first copy
    // back finds this chunk different, the rest equal.
    let out = guest_run(
        dr,
        &dr.base,
        dr_vm,
        "B0",
        "echo KEEL-CDP-DR-6 | dd of=/dev/vda2 bs=4096 seek=350 conv=fsync 2>/dev/null",
    );
    assert!(out.contains("B0=0"), "{out}");
    dr.run_action(&format!(
        "/api/v1/protection-groups/{back_id}/actions/start"
    ));
    let out = guest_run(
        dr,
        &dr.base,
        dr_vm,
        "B1",
        "echo KEEL-CDP-BACK-5 | dd of=/dev/vda2 bs=4096 seek=340 conv=fsync 2>/dev/null",
    );
    assert!(out.contains("B1=0"), "{out}");
    let g = wait_for(
        dr,
        &format!("/api/v1/protection-groups/{back_id}"),
        "the reverse copy never finished",
        |g| {
            let o = &g["observed"];
            g["status_reason"] == ""
                && o["resyncing"] == false
                && o["dirty_chunks"] == 0
                && o["last_acked_seq"].as_u64() >= o["last_sealed_seq"].as_u64()
        },
    );
    eprintln!("reverse protection caught up: {}", g["observed"]);
    let o = &g["observed"];
    assert!(
        o["digest_equal"].as_u64().unwrap() > 0
            && o["digest_equal"].as_u64() < o["digest_compared"].as_u64(),
        "only what differs goes back: {o}"
    );

    // Failback: the DR VM shuts down, its protection drains and stops;
    // failover at the primary starts the original VM on its own volume.
    dr.action(dr_vm, "force-stop");
    dr.run_action(&format!("/api/v1/protection-groups/{back_id}/actions/stop"));
    let boots = console_count(state, vm, "KEEL-BOOTED");
    let (status, task) = api.call(
        "POST",
        &format!("{rg_path}/actions/failover"),
        Some(json!({})),
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    let rgv = api.ok("GET", &rg_path, None);
    assert_eq!(rgv["status"], "FAILED_OVER", "{rgv}");
    assert_eq!(rgv["failover"]["vm_ids"][0], vm, "the original VM: {rgv}");
    assert_eq!(api.vm_status(vm).0, "RUNNING");
    wait_console(state, vm, "KEEL-BOOTED", boots + 1);
    let out = guest_run(
        api,
        &api.base,
        vm,
        "B2",
        "dd if=/dev/vda2 bs=4096 skip=340 count=1 2>/dev/null | head -c 15; echo; \
         dd if=/dev/vda2 bs=4096 skip=350 count=1 2>/dev/null | head -c 15; echo; \
         dd if=/dev/vda2 bs=4096 skip=330 count=1 2>/dev/null | head -c 15; echo",
    );
    assert!(out.contains("KEEL-CDP-DR-6"), "{out}");
    assert!(
        out.contains("KEEL-CDP-BACK-5"),
        "written at the DR site, back at the primary: {out}"
    );
    assert!(out.contains("KEEL-CDP-LAST-4"), "{out}");

    // The reverse groups go; the original volume stays.
    let (status, problem) = api.delete_read(&rg_path, &rgv);
    assert_eq!(status, 204, "{problem}");
    let g = dr.ok("GET", &format!("/api/v1/protection-groups/{back_id}"), None);
    let (status, problem) = dr.delete_read(&format!("/api/v1/protection-groups/{back_id}"), &g);
    assert_eq!(status, 204, "{problem}");
    let v = api.ok("GET", &format!("/api/v1/volumes/{volume_id}"), None);
    assert_eq!(v["status"], "IN_USE", "{v}");
}

/// Runs `cmd` in the guest over its serial-console WebSocket (the guest's
/// command loop reads "<tag> <lines>" and the base64 of the script, and
/// answers "<tag>=<exit code>" after the output).
fn guest_run(api: &Api, base: &str, vm: &str, tag: &str, cmd: &str) -> String {
    let ticket = api.ok(
        "POST",
        &format!("/api/v1/vms/{vm}/console"),
        Some(json!({"kind": "serial"})),
    );
    let ws_url = format!(
        "{}{}",
        base.replace("http://", "ws://"),
        ticket["url"].as_str().unwrap()
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{cmd}\n"));
    let out = console_read_until(
        &ws_url,
        Some(format!("{tag} 1\n{b64}\n").as_bytes()),
        format!("{tag}=").as_bytes(),
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// Two files have the same length and bytes.
fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// A WebSocket request to the API with the caller's token.
fn ws_request(api: &Api, base: &str, path: &str) -> tungstenite::handshake::client::Request {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("{}{path}", base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token).parse().unwrap(),
    );
    req
}

/// Watches a task over its WebSocket until the server closes it; returns
/// the states it pushed, in order.
fn watch_task(api: &Api, base: &str, task: &str) -> Vec<String> {
    let (mut ws, _) = tungstenite::connect(ws_request(
        api,
        base,
        &format!("/api/v1/tasks/{task}/watch"),
    ))
    .unwrap();
    let mut states = Vec::new();
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["id"], task);
                states.push(v["state"].as_str().unwrap().to_owned());
            }
            Ok(tungstenite::Message::Close(frame)) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1000));
                return states;
            }
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => return states,
            Err(e) => panic!("task watch: {e}; so far {states:?}"),
        }
    }
}

/// Destroys and undefines the domain if a failed test left it.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let name = format!("keel-{}", self.0);
        for args in [vec!["destroy", &name], vec!["undefine", "--nvram", &name]] {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system"])
                .args(&args)
                .output();
        }
    }
}

#[test]
fn vm_from_an_uploaded_image_boots_on_keel_disks_and_follows_its_lifecycle() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let image_path = work.path().join("guest.img");
    guest_disk_image(&image_path, SCRIPT, 4).unwrap();
    let image = std::fs::read(&image_path).unwrap();
    let digest: String = Sha256::digest(&image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let accel = match Accel::detect().unwrap() {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    // The "outside": a namespace on the external network's wire, at its
    // gateway address, reached through this host's uplink interface.
    let outside = NetnsHost::new("outside").unwrap();
    let uplink = root_veth(&outside, "eth0").unwrap();
    outside.add_addr("eth0", "198.18.0.1/24").unwrap();
    let peers_file = work.path().join("outside-peers");
    // A TCP server outside that greets and writes down who connected.
    serve_greeting(&outside, 7000, "HELLO-FROM-OUTSIDE", &peers_file).unwrap();
    let mut keel = KeelProcess::up_with(
        &state,
        &[
            "--accel",
            accel,
            "--vm-shutdown-timeout",
            "5",
            "--uplink",
            &format!("public={uplink}"),
        ],
    )
    .unwrap();
    let password = std::fs::read_to_string(state.join("admin-password")).unwrap();
    let (status, login) = {
        let r = ureq::post(&keel.url("/api/v1/auth/login"))
            .send_json(json!({"username": "admin", "password": password.trim()}));
        match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => (r.status(), r.into_json::<Value>().unwrap()),
            Err(e) => panic!("login: {e}"),
        }
    };
    assert_eq!(status, 200, "{login}");
    let api = Api {
        base: keel.url(""),
        token: login["access_token"].as_str().unwrap().to_owned(),
    };
    // The agent registered this host with its inventory.
    let hosts = api.ok("GET", "/api/v1/hosts", None);
    let host = &hosts["items"][0];
    assert_eq!(host["status"], "ENABLED", "{hosts}");
    assert_eq!(host["cpu_arch"], std::env::consts::ARCH);
    assert!(host["cores"].as_u64().unwrap() >= 1, "{host}");
    assert!(host["memory_bytes"].as_u64().unwrap() > 0, "{host}");
    assert_eq!(host["uplinks"]["public"], uplink.as_str(), "{host}");
    let host_id = host["id"].as_str().unwrap().to_owned();
    let vdc = api.ok("POST", "/api/v1/vdcs", Some(json!({"name": "tenant-a"})));
    let vdc_id = vdc["id"].as_str().unwrap();

    // Upload: a wrong checksum is refused and the upload starts over.
    let img = api.ok(
        "POST",
        "/api/v1/images",
        Some(
            json!({"name": "busybox-uefi", "vdc_id": vdc_id, "format": "raw",
                    "firmware": "uefi", "size_bytes": image.len(), "sha256": digest}),
        ),
    );
    let image_id = img["id"].as_str().unwrap().to_owned();
    let (status, body) = api.call(
        "POST",
        "/api/v1/volumes",
        Some(json!({"name": "early", "vdc_id": vdc_id, "image_id": image_id})),
    );
    assert_eq!(status, 422, "a volume from a QUEUED image: {body}");
    api.upload(&image_id, &image);
    let img = api.ok("GET", &format!("/api/v1/images/{image_id}"), None);
    assert_eq!(img["status"], "ACTIVE", "{img}");

    // Volume from the image, provisioned by a task.
    let (status, task) = api.call(
        "POST",
        "/api/v1/volumes",
        Some(json!({"name": "root", "vdc_id": vdc_id, "image_id": image_id})),
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    let volume_id = task["resource_id"].as_str().unwrap().to_owned();
    let volume = api.ok("GET", &format!("/api/v1/volumes/{volume_id}"), None);
    assert_eq!(volume["status"], "AVAILABLE", "{volume}");

    // A VM bigger than the host, or on a host in maintenance, is refused.
    let (status, body) = api.call(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "huge", "vdc_id": vdc_id, "vcpus": 1, "memory_mib": 1_048_576, "volume_ids": [volume_id]})),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("memory"),
        "{body}"
    );
    api.ok(
        "POST",
        &format!("/api/v1/hosts/{host_id}/actions/maintenance"),
        None,
    );
    let (status, body) = api.call(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "vm1", "vdc_id": vdc_id, "vcpus": 1, "memory_mib": 256, "volume_ids": [volume_id]})),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("MAINTENANCE"),
        "{body}"
    );
    api.ok(
        "POST",
        &format!("/api/v1/hosts/{host_id}/actions/enable"),
        None,
    );

    // The VM, created stopped so its pristine disk can be snapshotted.
    let (status, task) = api.call(
        "POST",
        "/api/v1/vms",
        Some(
            json!({"name": "vm1", "vdc_id": vdc_id, "vcpus": 1, "memory_mib": 256,
                    "volume_ids": [volume_id], "start": false}),
        ),
    );
    assert_eq!(status, 202, "{task}");
    let vm = task["resource_id"].as_str().unwrap().to_owned();
    let _guard = DomainGuard(vm.clone());
    api.wait_task(&task);
    assert_eq!(api.vm_status(&vm).0, "STOPPED");
    let v = api.ok("GET", &format!("/api/v1/vms/{vm}"), None);
    assert_eq!(v["firmware"], "uefi", "firmware comes from the image: {v}");
    assert_eq!(v["host_id"], host_id.as_str());
    let volume = api.ok("GET", &format!("/api/v1/volumes/{volume_id}"), None);
    assert_eq!(volume["status"], "IN_USE");
    assert_eq!(volume["attached_to"], vm.as_str());
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/vms/{vm}/snapshots"),
        Some(json!({"name": "pristine"})),
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    let snaps = api.ok("GET", &format!("/api/v1/vms/{vm}/snapshots"), None);
    let snap = snaps["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(snaps["items"][0]["status"], "AVAILABLE", "{snaps}");
    // The snapshot keeps the UEFI NVRAM of the cut with the disks.
    let nvram = state.join("vms").join(&vm).join("nvram.fd");
    let snap_nvram = state.join("snapshots").join(&snap).join("nvram.fd");
    assert!(same_content(&nvram, &snap_nvram));

    api.action(&vm, "start");
    assert_eq!(api.vm_status(&vm).0, "RUNNING");
    wait_console(&state, &vm, "KEEL-WROTE", 1);

    // Consoles over WebSocket with one-time tickets: VNC speaks RFB, the
    // serial console runs a command in the guest.
    let start = Instant::now();
    while api.ok("GET", &format!("/api/v1/vms/{vm}"), None)["vnc_port"].is_null() {
        assert!(start.elapsed() < TASK_TIMEOUT, "VNC port never observed");
        std::thread::sleep(Duration::from_millis(250));
    }
    let ticket = api.ok(
        "POST",
        &format!("/api/v1/vms/{vm}/console"),
        Some(json!({"kind": "vnc"})),
    );
    let ws_url = format!(
        "{}{}",
        keel.url("").replace("http://", "ws://"),
        ticket["url"].as_str().unwrap()
    );
    let first = console_read_until(&ws_url, None, b"RFB ");
    assert!(
        first.starts_with(b"RFB 003."),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    let reused = tungstenite::connect(ws_url.as_str());
    assert!(reused.is_err(), "a ticket works once");
    let ticket = api.ok(
        "POST",
        &format!("/api/v1/vms/{vm}/console"),
        Some(json!({"kind": "serial"})),
    );
    let ws_url = format!(
        "{}{}",
        keel.url("").replace("http://", "ws://"),
        ticket["url"].as_str().unwrap()
    );
    // The guest's command loop: "<tag> <lines>", then base64 of the script.
    let out = console_read_until(
        &ws_url,
        Some(b"T1 1\nZWNobyBLRUVMLVNFUklBTC1PSwo=\n"),
        b"KEEL-SERIAL-OK",
    );
    assert!(out.windows(14).any(|w| w == b"KEEL-SERIAL-OK"));

    // A second VM cannot take the same disk.
    let (status, body) = api.call(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "vm2", "vdc_id": vdc_id, "vcpus": 1, "memory_mib": 256, "volume_ids": [volume_id]})),
    );
    assert_eq!(status, 409, "{body}");

    // Data written before a reboot is there after it.
    api.action(&vm, "force-reboot");
    wait_console(&state, &vm, "KEEL-FOUND KEEL-DATA-7", 1);

    // Pause / resume, and an illegal action names the allowed states.
    api.action(&vm, "pause");
    assert_eq!(api.vm_status(&vm).0, "PAUSED");
    let (status, body) = api.call("POST", &format!("/api/v1/vms/{vm}/actions/pause"), None);
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("RUNNING"),
        "{body}"
    );
    api.action(&vm, "resume");
    assert_eq!(api.vm_status(&vm).0, "RUNNING");

    // A disk attached to the running VM appears in the guest and takes
    // writes; detached, it leaves the guest; grown while detached, it comes
    // back bigger with its data.
    let (status, task) = api.call(
        "POST",
        "/api/v1/volumes",
        Some(json!({"name": "hot", "vdc_id": vdc_id, "size_gib": 1})),
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    let hot = task["resource_id"].as_str().unwrap().to_owned();
    let hot_file = state.join("volumes").join(format!("{hot}.raw"));
    let attach = |api: &Api, vol: &str| {
        let (status, task) = api.call(
            "POST",
            &format!("/api/v1/vms/{vm}/volumes"),
            Some(json!({"volume_id": vol})),
        );
        assert_eq!(status, 202, "{task}");
        api.wait_task(&task);
        let v = api.ok("GET", &format!("/api/v1/volumes/{vol}"), None);
        assert_eq!(v["status"], "IN_USE", "{v}");
        let spec = api.ok("GET", &format!("/api/v1/vms/{vm}"), None);
        assert_eq!(spec["volume_ids"][1], vol, "{spec}");
    };
    let detach = |api: &Api, vol: &str| {
        let (status, task) = api.call("DELETE", &format!("/api/v1/vms/{vm}/volumes/{vol}"), None);
        assert_eq!(status, 202, "{task}");
        api.wait_task(&task);
        let v = api.ok("GET", &format!("/api/v1/volumes/{vol}"), None);
        assert_eq!(v["status"], "AVAILABLE", "{v}");
        assert!(v["attached_to"].is_null(), "{v}");
    };
    let wait_vdb =
        "i=0; while [ ! -e /sys/block/vdb ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done";
    attach(&api, &hot);
    let out = guest_run(
        &api,
        &keel.url(""),
        &vm,
        "H1",
        &format!("{wait_vdb}; echo SECTORS=$(cat /sys/block/vdb/size); echo KEEL-HOTPLUG | dd of=/dev/vdb conv=fsync 2>/dev/null"),
    );
    assert!(
        out.contains("SECTORS=2097152"),
        "1 GiB disk in the guest: {out}"
    );
    assert!(out.contains("H1=0"), "{out}");
    detach(&api, &hot);
    let out = guest_run(
        &api,
        &keel.url(""),
        &vm,
        "H2",
        "i=0; while [ -e /sys/block/vdb ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; [ ! -e /sys/block/vdb ] && echo VDB-GONE",
    );
    assert!(
        out.contains("VDB-GONE"),
        "the guest released the disk: {out}"
    );
    let head = std::fs::read(&hot_file).unwrap()[..12].to_vec();
    assert_eq!(
        head, b"KEEL-HOTPLUG",
        "the guest's write reached the volume"
    );

    // Backups through the API: the first is full; after the guest writes
    // one block through keel's disk server, the next reads only the chunk
    // its changed-block bitmap marks. Each restores into a new volume
    // holding exactly the volume's content at its point.
    let backup = |api: &Api, name: &str| -> Value {
        let (status, task) = api.call(
            "POST",
            &format!("/api/v1/volumes/{hot}/backups"),
            Some(json!({"name": name})),
        );
        assert_eq!(status, 202, "{task}");
        let done = api.wait_task(&task);
        let id = done["params"]["backup_id"].as_str().unwrap();
        let b = api.ok("GET", &format!("/api/v1/backups/{id}"), None);
        assert_eq!(b["status"], "AVAILABLE", "{b}");
        b
    };
    let b1 = backup(&api, "b1");
    assert_eq!(b1["kind"], "full", "{b1}");
    attach(&api, &hot);
    let out = guest_run(
        &api,
        &keel.url(""),
        &vm,
        "H4",
        &format!(
            "{wait_vdb}; echo KEEL-INCR | dd of=/dev/vdb bs=1M seek=512 conv=fsync 2>/dev/null"
        ),
    );
    assert!(out.contains("H4=0"), "{out}");
    detach(&api, &hot);
    let b2 = backup(&api, "b2");
    assert_eq!(b2["kind"], "incremental", "{b2}");
    let (read, total) = (
        b2["chunks_read"].as_u64().unwrap(),
        b2["chunks_total"].as_u64().unwrap(),
    );
    assert!(
        read >= 1 && read * 16 <= total,
        "read {read} of {total} chunks: {b2}"
    );
    let restore = |api: &Api, b: &Value, name: &str| -> (String, std::path::PathBuf) {
        let (status, task) = api.call(
            "POST",
            &format!(
                "/api/v1/backups/{}/actions/restore",
                b["id"].as_str().unwrap()
            ),
            Some(json!({"name": name})),
        );
        assert_eq!(status, 202, "{task}");
        api.wait_task(&task);
        let id = task["resource_id"].as_str().unwrap().to_owned();
        let v = api.ok("GET", &format!("/api/v1/volumes/{id}"), None);
        assert_eq!(v["status"], "AVAILABLE", "{v}");
        let file = state.join("volumes").join(format!("{id}.raw"));
        (id, file)
    };
    let (r2, r2_file) = restore(&api, &b2, "from-b2");
    assert!(
        same_content(&r2_file, &hot_file),
        "restore of b2 equals the volume"
    );
    let (r1, r1_file) = restore(&api, &b1, "from-b1");
    let at = |f: &Path, offset: u64| {
        use std::io::{Read, Seek};
        let mut file = std::fs::File::open(f).unwrap();
        file.seek(std::io::SeekFrom::Start(offset)).unwrap();
        let mut buf = [0u8; 12];
        file.read_exact(&mut buf).unwrap();
        buf
    };
    assert_eq!(&at(&r1_file, 0), b"KEEL-HOTPLUG");
    assert_eq!(
        &at(&r1_file, 512 << 20)[..9],
        &[0u8; 9],
        "b1 predates the second write"
    );
    assert_eq!(&at(&r2_file, 512 << 20)[..9], b"KEEL-INCR");
    for b in [&b1, &b2] {
        let (status, task) =
            api.delete_read(&format!("/api/v1/backups/{}", b["id"].as_str().unwrap()), b);
        assert_eq!(status, 202, "{task}");
        api.wait_task(&task);
        let gone = api.call(
            "GET",
            &format!("/api/v1/backups/{}", b["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(gone.0, 404);
    }
    for r in [&r1, &r2] {
        let v = api.ok("GET", &format!("/api/v1/volumes/{r}"), None);
        let (status, body) = api.delete_read(&format!("/api/v1/volumes/{r}"), &v);
        assert_eq!(status, 204, "{body}");
    }

    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/volumes/{hot}/actions/resize"),
        Some(json!({"size_gib": 2})),
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    assert_eq!(std::fs::metadata(&hot_file).unwrap().len(), 2 << 30);
    attach(&api, &hot);
    let out = guest_run(
        &api,
        &keel.url(""),
        &vm,
        "H3",
        &format!("{wait_vdb}; echo SECTORS=$(cat /sys/block/vdb/size); dd if=/dev/vdb bs=12 count=1 2>/dev/null; echo"),
    );
    assert!(out.contains("SECTORS=4194304"), "grown to 2 GiB: {out}");
    assert!(out.contains("KEEL-HOTPLUG"), "data kept: {out}");
    detach(&api, &hot);
    let v = api.ok("GET", &format!("/api/v1/volumes/{hot}"), None);
    assert_eq!(v["size_bytes"], 2u64 << 30);
    let (status, body) = api.delete_read(&format!("/api/v1/volumes/{hot}"), &v);
    assert_eq!(status, 204, "{body}");
    assert!(!hot_file.exists());

    // A qcow2 volume (keel's qcow2 engine behind the same disk server):
    // hot-plugged, written by the guest across clusters, detached (the
    // server writes its cluster map back), clean by qemu-img's check and
    // holding the guest's bytes; grown while detached, back bigger with
    // its data.
    let (status, task) = api.call(
        "POST",
        "/api/v1/volumes",
        Some(json!({"name": "q", "vdc_id": vdc_id, "size_gib": 1,
                    "format": "qcow2", "cluster_size_kib": 128})),
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    let q = task["resource_id"].as_str().unwrap().to_owned();
    let q_file = state.join("volumes").join(format!("{q}.qcow2"));
    assert!(q_file.exists(), "a .qcow2 file");
    attach(&api, &q);
    let out = guest_run(
        &api,
        &keel.url(""),
        &vm,
        "Q1",
        &format!(
            "{wait_vdb}; echo SECTORS=$(cat /sys/block/vdb/size); \
             dd if=/dev/urandom of=/tmp/q bs=4096 count=100 2>/dev/null; \
             dd if=/tmp/q of=/dev/vdb bs=4096 seek=5 conv=fsync 2>/dev/null; \
             echo KEEL-QCOW2 | dd of=/dev/vdb bs=1M seek=700 conv=fsync 2>/dev/null; \
             echo 3 > /proc/sys/vm/drop_caches; \
             echo WROTE=$(md5sum < /tmp/q | cut -c1-32) \
             READ=$(dd if=/dev/vdb bs=4096 skip=5 count=100 2>/dev/null | md5sum | cut -c1-32)"
        ),
    );
    assert!(out.contains("SECTORS=2097152"), "1 GiB qcow2 disk: {out}");
    let md5_of = |key: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_default()
            .to_owned()
    };
    let wrote = md5_of("WROTE=");
    assert_eq!(wrote.len(), 32, "{out}");
    assert_eq!(
        md5_of("READ="),
        wrote,
        "the guest reads back its write: {out}"
    );
    detach(&api, &q);
    let check = std::process::Command::new("qemu-img")
        .args(["check", q_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let q_raw = work.path().join("q.raw");
    let convert = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "raw",
            q_file.to_str().unwrap(),
            q_raw.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(convert.success());
    let raw = std::fs::read(&q_raw).unwrap();
    assert_eq!(&raw[700 << 20..(700 << 20) + 10], b"KEEL-QCOW2");
    assert_eq!(raw.len(), 1 << 30);
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/volumes/{q}/actions/resize"),
        Some(json!({"size_gib": 2})),
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    attach(&api, &q);
    let out = guest_run(
        &api,
        &keel.url(""),
        &vm,
        "Q2",
        &format!("{wait_vdb}; echo SECTORS=$(cat /sys/block/vdb/size); dd if=/dev/vdb bs=1M skip=700 count=1 2>/dev/null | head -c 10; echo"),
    );
    assert!(out.contains("SECTORS=4194304"), "grown to 2 GiB: {out}");
    assert!(out.contains("KEEL-QCOW2"), "data kept: {out}");
    detach(&api, &q);
    let v = api.ok("GET", &format!("/api/v1/volumes/{q}"), None);
    assert_eq!(v["format"], "qcow2", "{v}");
    let (status, body) = api.delete_read(&format!("/api/v1/volumes/{q}"), &v);
    assert_eq!(status, 204, "{body}");
    assert!(!q_file.exists());

    protect_and_replicate(&api, work.path(), &state, accel, vdc_id, &vm, &volume_id);

    // QEMU killed behind keel's back: reported STOPPED, with a reason.
    let pid = qemu_pid(&vm).expect("QEMU process of the VM");
    // SAFETY: kill(2) with a pid read from pgrep; at worst it names no process.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let reason = api.wait_status(&vm, "STOPPED");
    assert!(reason.contains("without keel"), "{reason}");

    // Start again: the disk backend serves the new QEMU; then a graceful
    // stop (busybox ignores ACPI, so it is forced after the timeout).
    let boots = console_count(&state, &vm, "KEEL-BOOTED");
    api.action(&vm, "start");
    assert_eq!(api.vm_status(&vm).0, "RUNNING");
    wait_console(&state, &vm, "KEEL-BOOTED", boots + 1);

    // A clone of the running VM boots from copies of its disks: it finds
    // the data the source wrote, on its own disk.
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/vms/{vm}/clone"),
        Some(json!({"name": "vm1-clone"})),
    );
    assert_eq!(status, 202, "{task}");
    let task = api.wait_task(&task);
    let clone = task["params"]["vm_ids"][0].as_str().unwrap().to_owned();
    let _clone_guard = DomainGuard(clone.clone());
    assert_eq!(
        api.vm_status(&vm).0,
        "RUNNING",
        "the source resumes after the cut"
    );
    assert_eq!(api.vm_status(&clone).0, "RUNNING");
    assert!(state.join("vms").join(&clone).join("nvram.fd").exists());
    wait_console(&state, &clone, "KEEL-FOUND KEEL-DATA-7", 1);
    let c = api.ok("GET", &format!("/api/v1/vms/{clone}"), None);
    assert_ne!(c["volume_ids"][0], volume_id.as_str(), "{c}");
    let (status, task) = api.call(
        "DELETE",
        &format!("/api/v1/vms/{clone}?delete_volumes=true"),
        None,
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);

    // A VM backup of the running VM: every disk at one cut, with the VM's
    // configuration and UEFI variables. It outlives the VM: restored below,
    // once the VM and its disks are deleted.
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/vms/{vm}/backups"),
        Some(json!({"name": "vm1-backup"})),
    );
    assert_eq!(status, 202, "{task}");
    let task = api.wait_task(&task);
    let vm_backup = task["params"]["vm_backup_id"].as_str().unwrap().to_owned();
    let vb = api.ok("GET", &format!("/api/v1/vm-backups/{vm_backup}"), None);
    assert_eq!(vb["status"], "AVAILABLE", "{vb}");
    assert!(vb["nvram_point"].is_string(), "UEFI variables kept: {vb}");
    let disk_backup = vb["disks"][0]["backup_id"].as_str().unwrap().to_owned();
    let db = api.ok("GET", &format!("/api/v1/backups/{disk_backup}"), None);
    assert_eq!(db["status"], "AVAILABLE", "{db}");
    assert_eq!(
        api.vm_status(&vm).0,
        "RUNNING",
        "the source resumes after the cut"
    );

    // The graceful stop takes the shutdown timeout: its task's progress is
    // pushed over a WebSocket until it ends.
    let (status, task) = api.call("POST", &format!("/api/v1/vms/{vm}/actions/stop"), None);
    assert_eq!(status, 202, "{task}");
    let states = watch_task(&api, &keel.url(""), task["id"].as_str().unwrap());
    assert_eq!(
        states.last().map(String::as_str),
        Some("SUCCEEDED"),
        "{states:?}"
    );
    assert!(states.iter().any(|s| s == "RUNNING"), "{states:?}");
    assert_eq!(api.vm_status(&vm).0, "STOPPED");
    let unknown = ws_request(&api, &keel.url(""), "/api/v1/tasks/no-such-task/watch");
    match tungstenite::connect(unknown) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        other => panic!("watching an unknown task: {:?}", other.map(|_| ())),
    }
    let (status, body) = api.call("POST", &format!("/api/v1/vms/{vm}/actions/resume"), None);
    assert_eq!(status, 409, "{body}");

    // Revert to the pristine snapshot: the marker is gone, so the next
    // boot writes it again.
    let (status, body) = api.call(
        "POST",
        &format!("/api/v1/vms/{vm}/snapshots/{snap}/revert"),
        None,
    );
    assert_eq!(status, 202, "{body}");
    api.wait_task(&body);
    assert!(
        same_content(&nvram, &snap_nvram),
        "revert brings the NVRAM back too"
    );
    api.action(&vm, "start");
    wait_console(&state, &vm, "KEEL-WROTE", 2);
    api.action(&vm, "force-stop");
    assert_eq!(api.vm_status(&vm).0, "STOPPED");

    // Pristine again, then the VM backup restored over the VM itself: the
    // next boot finds the marker the backup holds and writes none.
    let (status, body) = api.call(
        "POST",
        &format!("/api/v1/vms/{vm}/snapshots/{snap}/revert"),
        None,
    );
    assert_eq!(status, 202, "{body}");
    api.wait_task(&body);
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/vm-backups/{vm_backup}/actions/restore"),
        Some(json!({"in_place": true})),
    );
    assert_eq!(status, 202, "{task}");
    assert_eq!(task["action"], "restore-backup", "{task}");
    api.wait_task(&task);
    let found = console_count(&state, &vm, "KEEL-FOUND KEEL-DATA-7");
    api.action(&vm, "start");
    wait_console(&state, &vm, "KEEL-FOUND KEEL-DATA-7", found + 1);
    assert_eq!(console_count(&state, &vm, "KEEL-WROTE"), 2);
    api.action(&vm, "force-stop");

    // Delete with its volumes: nothing of it is left.
    let (status, task) = api.call(
        "DELETE",
        &format!("/api/v1/vms/{vm}?delete_volumes=true"),
        None,
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    assert_eq!(api.call("GET", &format!("/api/v1/vms/{vm}"), None).0, 404);
    assert_eq!(
        api.call("GET", &format!("/api/v1/volumes/{volume_id}"), None)
            .0,
        404
    );
    assert!(!virsh_has_domain(&vm), "domain still defined");
    assert!(qemu_pid(&vm).is_none(), "QEMU still running");
    assert!(!state.join("vms").join(&vm).exists(), "VM directory left");
    assert!(
        !state.join("snapshots").join(&snap).exists(),
        "snapshot left"
    );
    assert!(
        !state
            .join("volumes")
            .join(format!("{volume_id}.raw"))
            .exists(),
        "volume file left"
    );
    let backends = Command::new("pgrep")
        .args(["-f", &volume_id])
        .output()
        .unwrap();
    assert!(backends.stdout.is_empty(), "disk backend still running");

    // The VM backup restores into a new VM (new ID, same configuration):
    // it boots from the restored disk and finds the data the VM wrote.
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/vm-backups/{vm_backup}/actions/restore"),
        Some(json!({"name": "vm1-restored"})),
    );
    assert_eq!(status, 202, "{task}");
    let restored = task["resource_id"].as_str().unwrap().to_owned();
    let _restored_guard = DomainGuard(restored.clone());
    api.wait_task(&task);
    assert_eq!(api.vm_status(&restored).0, "RUNNING");
    let r = api.ok("GET", &format!("/api/v1/vms/{restored}"), None);
    assert_eq!(r["firmware"], "uefi", "{r}");
    assert!(state.join("vms").join(&restored).join("nvram.fd").exists());
    wait_console(&state, &restored, "KEEL-FOUND KEEL-DATA-7", 1);
    let (status, task) = api.call(
        "DELETE",
        &format!("/api/v1/vms/{restored}?delete_volumes=true"),
        None,
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    let vb = api.ok("GET", &format!("/api/v1/vm-backups/{vm_backup}"), None);
    let (status, task) = api.delete_read(&format!("/api/v1/vm-backups/{vm_backup}"), &vb);
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    assert_eq!(
        api.call("GET", &format!("/api/v1/vm-backups/{vm_backup}"), None)
            .0,
        404
    );
    assert_eq!(
        api.call("GET", &format!("/api/v1/backups/{disk_backup}"), None)
            .0,
        404
    );

    // Two VMs with NICs on two subnets of one VPC joined by a router: each
    // gets its port's address from keel's DHCP and pings the other through
    // keel's distributed router (vhost-user-net ports of the data plane the
    // agent runs from the store).
    let vpc = api.ok(
        "POST",
        "/api/v1/vpcs",
        Some(json!({"name": "vpc1", "vdc_id": vdc_id})),
    );
    let vpc_id = vpc["id"].as_str().unwrap();
    let mut subnet_ids = Vec::new();
    for (name, cidr) in [("a", "10.20.1.0/24"), ("b", "10.20.2.0/24")] {
        let s = api.ok(
            "POST",
            "/api/v1/subnets",
            Some(json!({"name": name, "vpc_id": vpc_id, "cidr": cidr})),
        );
        subnet_ids.push(s["id"].as_str().unwrap().to_owned());
    }
    // The external network on this host's uplink: the router's gateway
    // takes its first free address (198.18.0.2; .1 is the gateway).
    let public = api.ok(
        "POST",
        "/api/v1/external-networks",
        Some(json!({"name": "public", "physical_network": "public", "cidr": "198.18.0.0/24"})),
    );
    let public_id = public["id"].as_str().unwrap().to_owned();
    let router = api.ok(
        "POST",
        "/api/v1/routers",
        Some(json!({"name": "r1", "vdc_id": vdc_id,
                    "interfaces": [{"subnet_id": subnet_ids[0]}, {"subnet_id": subnet_ids[1]}],
                    "external_gateway": {"external_network_id": public_id}})),
    );
    assert_eq!(
        router["external_gateway"]["external_ip"], "198.18.0.2",
        "{router}"
    );
    let sg = api.ok(
        "POST",
        "/api/v1/security-groups",
        Some(json!({"name": "icmp-in", "vdc_id": vdc_id,
                    "rules": [{"direction": "ingress", "protocol": "icmp"}]})),
    );
    let sg_id = sg["id"].as_str().unwrap().to_owned();
    // The network resources the VMs' NICs bring onto this host.
    let network: Vec<String> = [
        format!("/api/v1/vpcs/{vpc_id}"),
        format!("/api/v1/subnets/{}", subnet_ids[0]),
        format!("/api/v1/subnets/{}", subnet_ids[1]),
        format!("/api/v1/routers/{}", router["id"].as_str().unwrap()),
        format!("/api/v1/security-groups/{sg_id}"),
        format!("/api/v1/external-networks/{public_id}"),
    ]
    .into();
    let network_status = |want: &str| {
        let start = Instant::now();
        for path in &network {
            loop {
                let r = api.ok("GET", path, None);
                if r["status"] == want {
                    let reason = r["status_reason"].as_str().unwrap();
                    assert_eq!(reason.is_empty(), want == "ACTIVE", "{path}: {r}");
                    break;
                }
                assert!(start.elapsed() < TASK_TIMEOUT, "{path} never {want}: {r}");
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    };
    network_status("PENDING");
    let mut vms = Vec::new();
    let mut nic_ports = Vec::new();
    let mut guards = Vec::new();
    for (i, subnet) in subnet_ids.iter().enumerate() {
        let groups = if i == 1 { json!([sg_id]) } else { json!([]) };
        let port = api.ok(
            "POST",
            "/api/v1/ports",
            Some(json!({"name": format!("nic{i}"), "subnet_id": subnet, "security_group_ids": groups})),
        );
        let (status, task) = api.call(
            "POST",
            "/api/v1/volumes",
            Some(json!({"name": format!("net{i}"), "vdc_id": vdc_id, "image_id": image_id})),
        );
        assert_eq!(status, 202, "{task}");
        api.wait_task(&task);
        let (status, task) = api.call(
            "POST",
            "/api/v1/vms",
            Some(
                json!({"name": format!("net{i}"), "vdc_id": vdc_id, "vcpus": 1, "memory_mib": 256,
                        "volume_ids": [task["resource_id"]], "port_ids": [port["id"]]}),
            ),
        );
        assert_eq!(status, 202, "{task}");
        let vm = task["resource_id"].as_str().unwrap().to_owned();
        guards.push(DomainGuard(vm.clone()));
        let port_id = port["id"].as_str().unwrap();
        let p = api.ok("GET", &format!("/api/v1/ports/{port_id}"), None);
        assert_eq!(p["device_id"], vm.as_str(), "{p}");
        vms.push((vm, port["fixed_ip"].as_str().unwrap().to_owned(), task));
        nic_ports.push(port_id.to_owned());
    }
    for (vm, ip, task) in &vms {
        api.wait_task(task);
        api.wait_status(vm, "RUNNING");
        wait_console(&state, vm, &format!("KEEL-LEASE ip={ip} "), 1);
    }
    for (vm, _, _) in &vms {
        let ports = api.ok("GET", "/api/v1/ports", None);
        let p = ports["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["device_id"] == vm.as_str())
            .unwrap();
        assert_eq!(p["status"], "ACTIVE", "served by the data plane: {p}");
    }
    network_status("ACTIVE");
    let peer = vms[1].1.clone();
    let run_in = |vm: &str, tag: &str, cmd: &str| guest_run(&api, &keel.url(""), vm, tag, cmd);
    let text = run_in(&vms[0].0, "P1", &format!("ping -c 3 -W 2 {peer}"));
    assert!(
        text.contains("P1=0"),
        "ping across the router failed: {text}"
    );
    assert!(text.contains("3 packets received"), "{text}");

    // The security group on the peer's port is enforced by the data plane:
    // without its ICMP rule the peer is unreachable (its own link still
    // works: it reaches its gateway), with it back it answers again.
    let set_rules = |rules: Value| {
        api.patch(
            &format!("/api/v1/security-groups/{sg_id}"),
            json!({ "rules": rules }),
        );
        let want = rules.as_array().unwrap().len() * 2;
        eventually("the rules reach the data plane", || {
            let n = applied(&state)["security_groups"][0]["rules"]
                .as_array()
                .map_or(usize::MAX, Vec::len);
            (n == want)
                .then_some(())
                .ok_or_else(|| format!("{n} rules"))
        });
    };
    set_rules(json!([]));
    assert!(
        keel.stderr().contains("data plane state applied in place"),
        "a rule change keeps the NICs: applied without a restart"
    );
    let text = run_in(&vms[1].0, "G1", "ping -c 3 -W 2 10.20.2.1");
    assert!(text.contains("G1=0"), "the peer's own link: {text}");
    let text = run_in(&vms[0].0, "P2", &format!("ping -c 3 -W 2 {peer}"));
    assert!(
        text.contains("0 packets received"),
        "denied by its group: {text}"
    );
    set_rules(json!([{"direction": "ingress", "protocol": "icmp"}]));
    let text = run_in(&vms[1].0, "G2", "ping -c 3 -W 2 10.20.2.1");
    assert!(text.contains("G2=0"), "the peer's own link: {text}");
    let text = run_in(&vms[0].0, "P3", &format!("ping -c 3 -W 2 {peer}"));
    assert!(text.contains("P3=0"), "allowed again: {text}");

    // An address group as the remote: the rule stays, the group's list
    // decides. Without the first VM's address the peer does not answer it;
    // once the address is added (an action on the group, no rule edit) the
    // agent recompiles the rule's prefix set and it answers.
    let ag = api.ok(
        "POST",
        "/api/v1/address-groups",
        Some(json!({"name": "pingers", "vdc_id": vdc_id, "addresses": ["192.0.2.0/24"]})),
    );
    let ag_id = ag["id"].as_str().unwrap().to_owned();
    // (As many rules as before: wait for the rule's remote, not a count.)
    set_rules(json!([{"direction": "ingress", "protocol": "icmp",
                      "remote_address_group_id": ag_id}]));
    eventually("the address-group rule reaches the data plane", || {
        let rule = applied(&state)["security_groups"][0]["rules"][0].clone();
        (rule["remote_address_group"] == ag_id.as_str())
            .then_some(())
            .ok_or_else(|| format!("{rule}"))
    });
    let text = run_in(&vms[0].0, "P4", &format!("ping -c 3 -W 2 {peer}"));
    assert!(
        text.contains("0 packets received"),
        "not in the address group: {text}"
    );
    api.ok(
        "POST",
        &format!("/api/v1/address-groups/{ag_id}/actions/add-addresses"),
        Some(json!({"addresses": [vms[0].1]})),
    );
    eventually("the address group reaches the data plane", || {
        let list = applied(&state)["address_groups"][0]["addresses"].clone();
        (list.as_array().map_or(0, Vec::len) == 2)
            .then_some(())
            .ok_or_else(|| format!("{list}"))
    });
    let text = run_in(&vms[0].0, "P5", &format!("ping -c 3 -W 2 {peer}"));
    assert!(text.contains("P5=0"), "in the address group: {text}");
    set_rules(json!([{"direction": "ingress", "protocol": "icmp"}]));
    eventually("the plain ICMP rule is back in the data plane", || {
        let rule = applied(&state)["security_groups"][0]["rules"][0].clone();
        rule["remote_address_group"]
            .is_null()
            .then_some(())
            .ok_or_else(|| format!("{rule}"))
    });

    // Out through the router's gateway: the first VM leaves by SNAT (the
    // outside sees the gateway address); the second gets a floating IP,
    // leaves as it and is reached at it from outside (its group admits
    // ICMP), until the floating IP is disassociated.
    let fip = api.ok(
        "POST",
        "/api/v1/floating-ips",
        Some(json!({"external_network_id": public_id, "vdc_id": vdc_id, "port_id": nic_ports[1]})),
    );
    let fip_id = fip["id"].as_str().unwrap().to_owned();
    let fip_ip = fip["floating_ip_address"].as_str().unwrap().to_owned();
    assert_eq!(fip_ip, "198.18.0.3", "{fip}");
    assert_eq!(fip["fixed_ip_address"], vms[1].1.as_str(), "{fip}");
    wait_for(
        &api,
        &format!("/api/v1/floating-ips/{fip_id}"),
        "floating IP ACTIVE",
        |f| f["status"] == "ACTIVE",
    );
    let outside_peers = || std::fs::read_to_string(&peers_file).unwrap_or_default();
    let text = run_in(&vms[0].0, "S1", "nc 198.18.0.1 7000 </dev/null");
    assert!(
        text.contains("HELLO-FROM-OUTSIDE") && text.contains("S1=0"),
        "{text}"
    );
    assert_eq!(
        outside_peers().lines().last(),
        Some("198.18.0.2"),
        "SNAT to the gateway address"
    );
    // A QoS policy marking DSCP EF (46) on the first VM's port: applied in
    // place, what it sends reaches the outside with the mark.
    let policy = api.ok(
        "POST",
        "/api/v1/qos-policies",
        Some(json!({"name": "ef", "vdc_id": vdc_id, "dscp_mark": 46})),
    );
    api.patch(
        &format!("/api/v1/ports/{}", nic_ports[0]),
        json!({ "qos_policy_id": policy["id"] }),
    );
    eventually("the port's QoS reaches the data plane", || {
        let qos = applied(&state)["qos"].clone();
        (qos[0]["dscp"] == 46)
            .then_some(())
            .ok_or_else(|| qos.to_string())
    });
    let marked = work.path().join("marked.pcap");
    outside
        .spawn(&[
            "tcpdump",
            "-Z",
            "root",
            "-n",
            "-U",
            "-c",
            "1",
            "-i",
            "eth0",
            "-w",
            &marked.display().to_string(),
            "tcp dst port 7000 and ip[1] & 0xfc == 184",
        ])
        .unwrap();
    eventually("tcpdump listens", || {
        marked.exists().then_some(()).ok_or_else(String::new)
    });
    let text = run_in(&vms[0].0, "S1b", "nc 198.18.0.1 7000 </dev/null");
    assert!(text.contains("S1b=0"), "{text}");
    eventually("a packet marked EF arrives outside", || {
        let n = std::fs::metadata(&marked).map_or(0, |m| m.len());
        (n > 24)
            .then_some(())
            .ok_or_else(|| format!("{n} bytes captured"))
    });
    let text = run_in(&vms[1].0, "S2", "nc 198.18.0.1 7000 </dev/null");
    assert!(
        text.contains("HELLO-FROM-OUTSIDE") && text.contains("S2=0"),
        "{text}"
    );
    assert_eq!(
        outside_peers().lines().last(),
        Some(fip_ip.as_str()),
        "leaves as its floating IP"
    );
    let ping_from_outside = || {
        outside
            .capture(&["ping", "-c", "3", "-W", "2", &fip_ip])
            .unwrap()
    };
    let out = ping_from_outside();
    assert!(
        out.stdout.contains("3 received"),
        "the floating IP answers: {out:?}"
    );
    api.patch(
        &format!("/api/v1/floating-ips/{fip_id}"),
        json!({ "port_id": null }),
    );
    eventually("the floating IP's translation is gone", || {
        let nat = applied(&state)["nat"].clone();
        let kept = nat
            .as_array()
            .is_some_and(|n| n.iter().any(|r| r["external_ip"] == fip_ip.as_str()));
        (!kept)
            .then_some(())
            .ok_or_else(|| format!("still in {nat}"))
    });
    let out = ping_from_outside();
    assert!(out.stdout.contains(" 0 received"), "disassociated: {out:?}");
    let text = run_in(&vms[1].0, "S3", "nc 198.18.0.1 7000 </dev/null");
    assert!(text.contains("S3=0"), "{text}");
    assert_eq!(
        outside_peers().lines().last(),
        Some("198.18.0.2"),
        "back to SNAT"
    );
    // Port forwarding: another floating IP's TCP 2222 reaches a listener
    // on port 8000 of the first VM (which has no security group).
    let forwarder = api.ok(
        "POST",
        "/api/v1/floating-ips",
        Some(json!({"external_network_id": public_id, "vdc_id": vdc_id,
                    "port_forwardings": [{"protocol": "tcp", "external_port": 2222,
                                          "internal_port_id": nic_ports[0], "internal_port": 8000}]})),
    );
    let forwarded_ip = forwarder["floating_ip_address"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for(
        &api,
        &format!("/api/v1/floating-ips/{}", forwarder["id"].as_str().unwrap()),
        "port forwarding ACTIVE",
        |f| f["status"] == "ACTIVE",
    );
    let text = run_in(
        &vms[0].0,
        "L1",
        "(echo HELLO-FROM-VM0 | nc -l -p 8000 >/dev/null 2>&1 &); sleep 1",
    );
    assert!(text.contains("L1=0"), "{text}");
    let out = outside
        .capture(&[
            "python3",
            "-c",
            &format!(
                "import socket\n\
                 s = socket.create_connection(('{forwarded_ip}', 2222), timeout=20)\n\
                 print(s.recv(64).decode())"
            ),
        ])
        .unwrap();
    assert!(
        out.stdout.contains("HELLO-FROM-VM0"),
        "forwarded to the VM: {out:?}"
    );
    // The router's firewall: TCP to the outside server denied for the
    // first subnet, then allowed again.
    let router_path = format!("/api/v1/routers/{}", router["id"].as_str().unwrap());
    let set_firewall = |rules: Value| {
        let n = rules.as_array().unwrap().len();
        api.patch(&router_path, json!({ "firewall_rules": rules }));
        eventually("the firewall reaches the data plane", || {
            let have = applied(&state)["firewall"].as_array().map_or(0, Vec::len);
            (have == n)
                .then_some(())
                .ok_or_else(|| format!("{have} rules"))
        });
    };
    set_firewall(json!([{"protocol": "tcp", "src_cidr": "10.20.1.0/24",
                          "dst_cidr": "198.18.0.1/32", "port_range_min": 7000,
                          "port_range_max": 7000, "action": "deny"}]));
    let text = run_in(&vms[0].0, "F1", "nc -w 3 198.18.0.1 7000 </dev/null");
    assert!(
        !text.contains("HELLO-FROM-OUTSIDE") && !text.contains("F1=0"),
        "denied: {text}"
    );
    set_firewall(json!([]));
    let text = run_in(&vms[0].0, "F2", "nc 198.18.0.1 7000 </dev/null");
    assert!(
        text.contains("HELLO-FROM-OUTSIDE") && text.contains("F2=0"),
        "allowed again: {text}"
    );

    // An L4 load balancer with its VIP on the second subnet, balanced by
    // the router's data plane: two web servers of the second VM (ports
    // 8001, 8002) behind VIP:8080, fetched from the first VM, with a TCP
    // health monitor the data plane runs itself.
    set_rules(json!([{"direction": "ingress", "protocol": "icmp"},
                     {"direction": "ingress", "protocol": "tcp",
                      "port_range_min": 8001, "port_range_max": 8002}]));
    let text = run_in(
        &vms[1].0,
        "W1",
        "mkdir -p /w1 /w2 && echo MEMBER-ONE > /w1/id && echo MEMBER-TWO > /w2/id && \
         httpd -p 8001 -h /w1 && httpd -p 8002 -h /w2",
    );
    let member_status =
        |l: &Value, i: usize| l["observed"]["pools"][0]["members"][i]["operating_status"].clone();
    assert!(text.contains("W1=0"), "{text}");
    let lb_doc = |drained: u16| {
        json!({"name": "web", "vdc_id": vdc_id, "vip_subnet_id": subnet_ids[1],
               "vip_address": "10.20.2.100",
               "listeners": [{"id": "http", "protocol": "TCP", "protocol_port": 8080,
                              "default_pool_id": "web"}],
               "pools": [{"id": "web", "protocol": "TCP", "lb_algorithm": "SOURCE_IP_PORT",
                          "healthmonitor": {"type": "TCP", "delay": 1, "timeout": 1,
                                            "max_retries": 1, "max_retries_down": 2},
                          "members": [
                   {"id": "one", "address": vms[1].1, "protocol_port": 8001},
                   {"id": "two", "address": vms[1].1, "protocol_port": 8002, "weight": drained}]}]})
    };
    let lb = api.ok("POST", "/api/v1/loadbalancers", Some(lb_doc(1)));
    let lb_path = format!("/api/v1/loadbalancers/{}", lb["id"].as_str().unwrap());
    let served = wait_for(
        &api,
        &lb_path,
        "load balancer ACTIVE, members ONLINE",
        |l| {
            l["status"] == "ACTIVE"
                && l["observed"]["listeners"][0]["operating_status"] == "ONLINE"
                && member_status(l, 0) == "ONLINE"
                && member_status(l, 1) == "ONLINE"
        },
    );
    assert_eq!(served["router_id"], router["id"], "{served}");
    let fetch = |tag: &str| {
        let text = run_in(
            &vms[0].0,
            tag,
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do \
             wget -q -O - http://10.20.2.100:8080/id; done",
        );
        assert!(text.contains(&format!("{tag}=0")), "{text}");
        (
            text.matches("MEMBER-ONE").count(),
            text.matches("MEMBER-TWO").count(),
        )
    };
    // Each connection is hashed on its own (client port): 16 spread over
    // both members (all on one: 1 in 32768).
    let (one, two) = fetch("B1");
    assert_eq!(one + two, 16, "every request answered through the VIP");
    assert!(one > 0 && two > 0, "both members serve: {one}/{two}");
    // The second server stops: the monitor takes it out (ERROR), every new
    // connection goes to the first; back when it listens again.
    let text = run_in(&vms[1].0, "K1", "killall httpd; httpd -p 8001 -h /w1");
    assert!(text.contains("K1=0"), "{text}");
    wait_for(&api, &lb_path, "the stopped member ERROR", |l| {
        member_status(l, 1) == "ERROR" && member_status(l, 0) == "ONLINE"
    });
    assert_eq!(fetch("B2"), (16, 0), "the member out gets nothing");
    let text = run_in(&vms[1].0, "K2", "httpd -p 8002 -h /w2");
    assert!(text.contains("K2=0"), "{text}");
    wait_for(&api, &lb_path, "the member ONLINE again", |l| {
        member_status(l, 1) == "ONLINE"
    });
    let (_, two) = fetch("B3");
    assert!(two > 0, "back in the selection");
    // A floating IP on the VIP's port: the outside reaches the members.
    let vip_fip = api.ok(
        "POST",
        "/api/v1/floating-ips",
        Some(json!({"external_network_id": public_id, "vdc_id": vdc_id,
                    "port_id": served["vip_port_id"]})),
    );
    let vip_fip_path = format!("/api/v1/floating-ips/{}", vip_fip["id"].as_str().unwrap());
    wait_for(&api, &vip_fip_path, "the VIP's floating IP ACTIVE", |f| {
        f["status"] == "ACTIVE"
    });
    let out = outside
        .capture(&[
            "python3",
            "-c",
            &format!(
                "import urllib.request\n\
                 for i in range(8):\n    \
                 print(urllib.request.urlopen('http://{}:8080/id', timeout=20).read().decode().strip())",
                vip_fip["floating_ip_address"].as_str().unwrap()
            ),
        ])
        .unwrap();
    let answered = out.stdout.matches("MEMBER-").count();
    assert_eq!(
        answered, 8,
        "through the floating IP to the members: {out:?}"
    );
    // Weight 0 drains the second member: new connections avoid it.
    api.at_revision("PUT", &lb_path, Some(lb_doc(0)));
    eventually("the drain reaches the data plane", || {
        let lbs = applied(&state)["load_balancers"].clone();
        (lbs[0]["members"][1]["weight"] == 0)
            .then_some(())
            .ok_or_else(|| lbs.to_string())
    });
    assert_eq!(fetch("B2"), (16, 0), "drained");
    let vip_port = served["vip_port_id"].as_str().unwrap().to_owned();
    api.at_revision("DELETE", &lb_path, None);
    eventually("the VIP leaves the data plane", || {
        let lbs = applied(&state)["load_balancers"].clone();
        lbs.as_array()
            .is_none_or(Vec::is_empty)
            .then_some(())
            .ok_or_else(|| lbs.to_string())
    });
    let (status, _) = api.call("GET", &format!("/api/v1/ports/{vip_port}"), None);
    assert_eq!(status, 404, "the VIP's port goes with it");
    let f = api.ok("GET", &vip_fip_path, None);
    assert!(
        f["port_id"].is_null(),
        "its floating IP is disassociated: {f}"
    );

    // A clone of a VM with a NIC gets its own port (new address and MAC on
    // the same subnet) and its lease for it from keel's DHCP.
    let (status, task) = api.call(
        "POST",
        &format!("/api/v1/vms/{}/clone", vms[0].0),
        Some(json!({"name": "net0-clone"})),
    );
    assert_eq!(status, 202, "{task}");
    let task = api.wait_task(&task);
    let clone = task["params"]["vm_ids"][0].as_str().unwrap().to_owned();
    guards.push(DomainGuard(clone.clone()));
    api.wait_status(&clone, "RUNNING");
    let ports = api.ok("GET", "/api/v1/ports", None);
    let of = |vm: &str| {
        ports["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["device_id"] == vm)
            .cloned()
            .unwrap_or_else(|| panic!("no port of {vm}: {ports}"))
    };
    let (source_port, clone_port) = (of(&vms[0].0), of(&clone));
    assert_eq!(clone_port["subnet_id"], source_port["subnet_id"]);
    assert_ne!(clone_port["fixed_ip"], source_port["fixed_ip"]);
    assert_ne!(clone_port["mac_address"], source_port["mac_address"]);
    let clone_ip = clone_port["fixed_ip"].as_str().unwrap();
    wait_console(&state, &clone, &format!("KEEL-LEASE ip={clone_ip} "), 1);
    let (status, task) = api.call(
        "DELETE",
        &format!("/api/v1/vms/{clone}?delete_volumes=true"),
        None,
    );
    assert_eq!(status, 202, "{task}");
    api.wait_task(&task);
    // The clone's NIC was keel's to make, so it goes with the clone; the
    // source's port (a user's) stays.
    assert_eq!(clone_port["delete_with_device"], true, "{clone_port}");
    assert_eq!(source_port["delete_with_device"], false, "{source_port}");
    let port_path = format!("/api/v1/ports/{}", clone_port["id"].as_str().unwrap());
    let (status, body) = api.call("GET", &port_path, None);
    assert_eq!(status, 404, "the clone's port is deleted with it: {body}");

    for (vm, _, _) in &vms {
        let (status, task) = api.call(
            "DELETE",
            &format!("/api/v1/vms/{vm}?delete_volumes=true"),
            None,
        );
        assert_eq!(status, 202, "{task}");
        api.wait_task(&task);
    }
    drop(guards);
    network_status("PENDING");

    // A clean stop of keel also stops the libvirt daemons it started.
    keel.signal(libc::SIGTERM).unwrap();
    assert!(keel.wait(Duration::from_secs(60)).unwrap().success());
}

/// What the guest of [`vms_boot_with_the_firmware_their_image_names`]
/// reports: which firmware started it and whether its kernel saw secure
/// boot enforced.
const FIRMWARE_SCRIPT: &str = r#"
if [ -d /sys/firmware/efi ]; then echo "KEEL-FIRMWARE uefi"; else echo "KEEL-FIRMWARE bios"; fi
if dmesg | grep -q "Secure boot enabled"; then echo "KEEL-SECUREBOOT on"; else echo "KEEL-SECUREBOOT off"; fi
"#;

/// Guests boot with the firmware their image names, inherited by the VM: a
/// `bios` image under SeaBIOS; a `uefi-secure` image whose boot chain is
/// signed (Debian's shim → GRUB → kernel) under OVMF with Microsoft's keys
/// and secure boot enforced, which the guest's kernel confirms; and a
/// `uefi-secure` image with an unsigned loader is refused by the firmware.
#[test]
fn vms_boot_with_the_firmware_their_image_names() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let accel = match Accel::detect().unwrap() {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let keel =
        KeelProcess::up_with(&state, &["--accel", accel, "--vm-shutdown-timeout", "5"]).unwrap();
    let api = login(&keel, &state);
    let vdc = api.ok("POST", "/api/v1/vdcs", Some(json!({"name": "firmware"})));
    let vdc_id = vdc["id"].as_str().unwrap();
    let mut guards = Vec::new();
    let mut boot = |name: &str, firmware: &str, loader: BootLoader| -> String {
        let path = work.path().join(format!("{name}.img"));
        guest_disk_image_with(&path, FIRMWARE_SCRIPT, 0, loader).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let img = api.ok(
            "POST",
            "/api/v1/images",
            Some(json!({"name": name, "vdc_id": vdc_id, "format": "raw",
                "firmware": firmware, "size_bytes": bytes.len(), "sha256": digest})),
        );
        let image_id = img["id"].as_str().unwrap();
        api.upload(image_id, &bytes);
        let (status, task) = api.call(
            "POST",
            "/api/v1/volumes",
            Some(json!({"name": name, "vdc_id": vdc_id, "image_id": image_id})),
        );
        assert_eq!(status, 202, "{task}");
        let volume_id = api.wait_task(&task)["resource_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, task) = api.call(
            "POST",
            "/api/v1/vms",
            // OVMF's SMM build and GRUB's decompression need more than the
            // 256 MiB the other guests get.
            Some(
                json!({"name": name, "vdc_id": vdc_id, "vcpus": 1, "memory_mib": 512,
                "volume_ids": [volume_id]}),
            ),
        );
        assert_eq!(status, 202, "{task}");
        let vm = task["resource_id"].as_str().unwrap().to_owned();
        guards.push(DomainGuard(vm.clone()));
        api.wait_task(&task);
        let v = api.ok("GET", &format!("/api/v1/vms/{vm}"), None);
        assert_eq!(v["firmware"], firmware, "{v}");
        vm
    };
    let bios = boot("bios", "bios", BootLoader::SystemdBoot);
    let secure = boot("secure", "uefi-secure", BootLoader::SignedShimGrub);
    let unsigned = boot("unsigned", "uefi-secure", BootLoader::SystemdBoot);

    wait_console(&state, &bios, "KEEL-FIRMWARE bios", 1);
    wait_console(&state, &secure, "KEEL-SECUREBOOT on", 1);
    assert_eq!(console_count(&state, &secure, "KEEL-FIRMWARE uefi"), 1);
    // The secure-boot keys live in the VM's own NVRAM, made from the
    // template with Microsoft's keys enrolled.
    assert!(state.join("vms").join(&secure).join("nvram.fd").exists());
    wait_console(&state, &unsigned, "Access Denied", 1);
    assert_eq!(console_count(&state, &unsigned, "KEEL-FIRMWARE"), 0);
    drop(guards);
}

/// Backups of a volume a RUNNING VM writes are cut at a point in time: the
/// agent pauses the VM for the cut (the disk server drains and freezes its
/// changed-block bitmap, the chunks to read are copied to staging) and
/// resumes it before the backup is stored. A full backup, then an
/// incremental that reads only the chunk the guest changed; each restores
/// the volume as it was at its cut.
#[test]
fn volumes_of_a_running_vm_are_backed_up_at_a_point_in_time() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let image_path = work.path().join("guest.img");
    guest_disk_image(&image_path, SCRIPT, 4).unwrap();
    let image = std::fs::read(&image_path).unwrap();
    let digest: String = Sha256::digest(&image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let accel = match Accel::detect().unwrap() {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let keel =
        KeelProcess::up_with(&state, &["--accel", accel, "--vm-shutdown-timeout", "5"]).unwrap();
    let api = login(&keel, &state);
    let vdc = api.ok("POST", "/api/v1/vdcs", Some(json!({"name": "live"})));
    let vdc_id = vdc["id"].as_str().unwrap();
    let img = api.ok(
        "POST",
        "/api/v1/images",
        Some(json!({"name": "guest", "vdc_id": vdc_id, "format": "raw",
            "firmware": "uefi", "size_bytes": image.len(), "sha256": digest})),
    );
    api.upload(img["id"].as_str().unwrap(), &image);
    let (status, task) = api.call(
        "POST",
        "/api/v1/volumes",
        Some(json!({"name": "root", "vdc_id": vdc_id, "image_id": img["id"]})),
    );
    assert_eq!(status, 202, "{task}");
    let root = api.wait_task(&task)["resource_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, task) = api.call(
        "POST",
        "/api/v1/volumes",
        Some(json!({"name": "data", "vdc_id": vdc_id, "size_gib": 1})),
    );
    assert_eq!(status, 202, "{task}");
    let data = api.wait_task(&task)["resource_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let data_file = state.join("volumes").join(format!("{data}.raw"));
    let (status, task) = api.call(
        "POST",
        "/api/v1/vms",
        Some(
            json!({"name": "live", "vdc_id": vdc_id, "vcpus": 1, "memory_mib": 256,
            "volume_ids": [root, data]}),
        ),
    );
    assert_eq!(status, 202, "{task}");
    let vm = task["resource_id"].as_str().unwrap().to_owned();
    let _guard = DomainGuard(vm.clone());
    api.wait_task(&task);
    assert_eq!(api.vm_status(&vm).0, "RUNNING");
    wait_console(&state, &vm, "KEEL-BOOTED", 1);

    let write = |tag: &str, marker: &str, mib: u64| {
        let out = guest_run(
            &api,
            &keel.url(""),
            &vm,
            tag,
            &format!("echo {marker} | dd of=/dev/vdb bs=1M seek={mib} conv=fsync 2>/dev/null"),
        );
        assert!(out.contains(&format!("{tag}=0")), "{out}");
    };
    let backup = |name: &str, running: bool| -> Value {
        let (status, task) = api.call(
            "POST",
            &format!("/api/v1/volumes/{data}/backups"),
            Some(json!({"name": name})),
        );
        assert_eq!(status, 202, "{task}");
        let done = api.wait_task(&task);
        let b = api.ok(
            "GET",
            &format!(
                "/api/v1/backups/{}",
                done["params"]["backup_id"].as_str().unwrap()
            ),
            None,
        );
        assert_eq!(b["status"], "AVAILABLE", "{b}");
        eprintln!(
            "online backup {name}: kind {} read {}/{} chunks, VM paused {} ms",
            b["kind"], b["chunks_read"], b["chunks_total"], b["paused_ms"]
        );
        if running {
            assert!(
                b["paused_ms"].is_u64(),
                "the VM was paused for the cut: {b}"
            );
            assert_eq!(api.vm_status(&vm).0, "RUNNING", "resumed after the cut");
        } else {
            assert!(b["paused_ms"].is_null(), "nothing to pause: {b}");
        }
        b
    };
    // Some data for the full backup's cut to copy (its pause is logged).
    let out = guest_run(
        &api,
        &keel.url(""),
        &vm,
        "R",
        "dd if=/dev/urandom of=/dev/vdb bs=1M seek=16 count=32 conv=fsync 2>/dev/null",
    );
    assert!(out.contains("R=0"), "{out}");
    write("A", "KEEL-LIVE-A", 256);
    let b1 = backup("live1", true);
    assert_eq!(b1["kind"], "full", "{b1}");
    write("B", "KEEL-LIVE-B", 384);
    let b2 = backup("live2", true);
    assert_eq!(b2["kind"], "incremental", "{b2}");
    let read = b2["chunks_read"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&read),
        "the incremental reads the chunk the guest changed: {b2}"
    );

    let restore = |b: &Value, name: &str| -> std::path::PathBuf {
        let (status, task) = api.call(
            "POST",
            &format!(
                "/api/v1/backups/{}/actions/restore",
                b["id"].as_str().unwrap()
            ),
            Some(json!({"name": name})),
        );
        assert_eq!(status, 202, "{task}");
        api.wait_task(&task);
        let id = task["resource_id"].as_str().unwrap();
        state.join("volumes").join(format!("{id}.raw"))
    };
    let at = |f: &Path, mib: u64| {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 11];
        std::fs::File::open(f)
            .unwrap()
            .read_exact_at(&mut buf, mib << 20)
            .unwrap();
        buf
    };
    let r1 = restore(&b1, "from-live1");
    assert_eq!(&at(&r1, 256), b"KEEL-LIVE-A");
    assert_eq!(at(&r1, 384), [0u8; 11], "backup 1 predates marker B");
    let r2 = restore(&b2, "from-live2");
    assert_eq!(&at(&r2, 256), b"KEEL-LIVE-A");
    assert_eq!(&at(&r2, 384), b"KEEL-LIVE-B");
    // The guest no longer writes the disk: the latest backup is the volume.
    assert!(
        same_content(&r2, &data_file),
        "restore of backup 2 equals the volume"
    );
    assert!(
        std::fs::read_dir(state.join("backups").join("staging"))
            .unwrap()
            .next()
            .is_none(),
        "no staging file is left"
    );
    assert_eq!(api.vm_status(&vm).0, "RUNNING");

    // Stopped, the VM keeps its disks attached and their servers running:
    // the backup asks the server for its live bitmap (the bitmap file is
    // theirs while they run) and finds nothing changed.
    api.action(&vm, "stop");
    assert_eq!(api.vm_status(&vm).0, "STOPPED");
    let b3 = backup("stopped", false);
    assert_eq!(b3["kind"], "incremental", "{b3}");
    assert_eq!(b3["chunks_read"], 0, "{b3}");
    assert!(
        std::fs::read_dir(state.join("backups").join("staging"))
            .unwrap()
            .next()
            .is_none(),
        "no staging file is left"
    );
}
