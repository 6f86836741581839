//! Resident memory of a real `keel up` (an API node: `--no-host-agent`, so
//! no VM or data-plane children) while idle and after it has created and
//! listed `ports` ports through HTTP. The goal is at most 150 MiB
//! with 10k ports; the peer is the same process idle, so the ratio is the
//! growth the records cost.

use std::path::PathBuf;
use std::time::Duration;

use keel_testkit::KeelProcess;
use serde_json::{json, Value};

use super::control::failed;
use crate::{BenchError, Measurement, Scale};

fn send(
    keel: &KeelProcess,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, BenchError> {
    let req = ureq::request(method, &keel.url(path))
        .timeout(Duration::from_secs(60))
        .set("authorization", &format!("Bearer {token}"));
    let reply = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    }
    .map_err(|e| failed(path, e))?;
    reply.into_json().map_err(|e| failed(path, e))
}

/// VmRSS of `pid` in MiB.
fn rss_mib(pid: u32) -> Result<f64, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| failed("VmRSS", &status))?;
    Ok(kib / 1024.0)
}

pub fn measurement(scale: Scale) -> Result<Measurement, BenchError> {
    let ports = match scale {
        Scale::Quick => 300,
        Scale::Full => 10_000,
    };
    if std::env::var_os("KEEL_BIN").is_none() {
        // The testkit looks for the binary beside a test executable; here
        // the running `keel bench` is that binary.
        std::env::set_var("KEEL_BIN", std::env::current_exe()?);
    }
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from);
    let dir = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in(base)?;
    let keel =
        KeelProcess::up_with(dir.path(), &["--no-host-agent"]).map_err(|e| failed("keel up", e))?;
    let password = std::fs::read_to_string(dir.path().join("admin-password"))?;
    let login = ureq::post(&keel.url("/api/v1/auth/login"))
        .send_json(json!({"username": "admin", "password": password.trim()}))
        .map_err(|e| failed("login", e))?
        .into_json::<Value>()
        .map_err(|e| failed("login", e))?;
    let token = login["access_token"]
        .as_str()
        .ok_or_else(|| failed("login", &login))?
        .to_owned();
    // Settle after start-up before the idle reading.
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_mib(keel.pid())?;
    let vdc = send(
        &keel,
        &token,
        "POST",
        "/api/v1/vdcs",
        Some(json!({"name": "rss"})),
    )?;
    let vpc = send(
        &keel,
        &token,
        "POST",
        "/api/v1/vpcs",
        Some(json!({"name": "rss", "vdc_id": vdc["id"]})),
    )?;
    let subnet = send(
        &keel,
        &token,
        "POST",
        "/api/v1/subnets",
        Some(json!({"name": "rss", "vpc_id": vpc["id"], "cidr": "10.0.0.0/16"})),
    )?;
    for i in 0..ports {
        send(
            &keel,
            &token,
            "POST",
            "/api/v1/ports",
            Some(json!({"name": format!("p{i}"), "subnet_id": subnet["id"]})),
        )?;
    }
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/ports?limit=1000&cursor={c}"),
            None => "/api/v1/ports?limit=1000".to_owned(),
        };
        let page = send(&keel, &token, "GET", &path, None)?;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let loaded = rss_mib(keel.pid())?;
    Ok(Measurement::new(
        &format!("keel up RSS after {ports} port creates and a full list (API node)"),
        "MiB",
        false,
        loaded,
    )
    .with_peer("the same process idle", idle))
}
