//! `keel up` as an operator runs it: a real process, a real HTTP client,
//! real signals.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use keel_testkit::{keel_bin, KeelProcess};
use serde_json::Value;

const EXIT_TIMEOUT: Duration = Duration::from_secs(90);

/// GET with status, content type and JSON body, whatever the status.
fn get(url: &str) -> (u16, String, Value) {
    request("GET", url)
}

fn request(method: &str, url: &str) -> (u16, String, Value) {
    let response = match ureq::request(method, url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let content_type = response
        .header("content-type")
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.into_json().unwrap_or(Value::Null);
    (status, content_type, body)
}

#[test]
fn serves_health_version_and_openapi() {
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();

    let (status, _, body) = get(&keel.url("/healthz"));
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");

    let (status, _, version) = get(&keel.url("/api/v1/version"));
    assert_eq!(status, 200);
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(version["api_version"], "v1");
    let newest = keel_control::store::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap();
    assert_eq!(version["schema_version"], newest);
    let instance = version["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(instance.len(), 36);

    let (status, _, spec) = get(&keel.url("/api/v1/openapi.json"));
    assert_eq!(status, 200);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    assert!(spec["paths"]["/healthz"]["get"].is_object(), "{spec}");
    assert!(
        spec["paths"]["/api/v1/version"]["get"].is_object(),
        "{spec}"
    );
    assert!(spec["components"]["schemas"]["Problem"].is_object());

    // The instance keeps its identity across restarts on the same state.
    drop(keel);
    let keel = KeelProcess::up(state.path()).unwrap();
    let (_, _, again) = get(&keel.url("/api/v1/version"));
    assert_eq!(again["instance_id"], instance.as_str());
    assert!(
        keel.stderr().contains("did not shut down cleanly"),
        "a killed run is reported: {}",
        keel.stderr()
    );
}

#[test]
fn errors_are_problem_details() {
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();

    let (status, content_type, body) = get(&keel.url("/api/v1/no-such-resource"));
    assert_eq!(status, 404);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["status"], 404);
    assert_eq!(body["title"], "Not Found");
    assert_eq!(body["type"], "about:blank");
    assert_eq!(body["instance"], "/api/v1/no-such-resource");

    let (status, content_type, body) = request("DELETE", &keel.url("/healthz"));
    assert_eq!(status, 405);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["status"], 405);
    assert_eq!(body["instance"], "/healthz");
    let response = match ureq::post(&keel.url("/healthz")).send_string("{}") {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(response.status(), 405);
    assert!(
        response.header("allow").unwrap_or_default().contains("GET"),
        "Allow kept"
    );

    // A body over the limit is refused from its Content-Length alone, before
    // any of it is read (raw socket: a client library would try to send it).
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(keel.addr.as_deref().unwrap()).unwrap();
    stream.set_read_timeout(Some(EXIT_TIMEOUT)).unwrap();
    write!(stream, "POST /api/v1/version HTTP/1.1\r\nHost: keel\r\nContent-Length: 2097152\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{response}"
    );
    assert!(response.contains("\"status\":413"), "{response}");
}

#[test]
fn sigterm_and_sigint_drain_and_record_a_clean_stop() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let state = tempfile::tempdir().unwrap();
        let mut keel = KeelProcess::up(state.path()).unwrap();
        assert_eq!(get(&keel.url("/healthz")).0, 200);
        let addr = keel.addr.clone().unwrap();

        keel.signal(signal).unwrap();
        let status = keel.wait(EXIT_TIMEOUT).unwrap();
        assert!(status.success(), "exit {status:?}: {}", keel.stderr());
        assert!(keel.stderr().contains("state flushed"), "{}", keel.stderr());
        // The port is free again and the next start finds a clean record.
        std::net::TcpListener::bind(&addr).unwrap();
        let keel = KeelProcess::up(state.path()).unwrap();
        assert!(
            !keel.stderr().contains("did not shut down cleanly"),
            "{}",
            keel.stderr()
        );
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let state = tempfile::tempdir().unwrap();
    let mut keel = KeelProcess::up(state.path()).unwrap();
    get(&keel.url("/healthz"));
    keel.signal(libc::SIGTERM).unwrap();
    keel.wait(EXIT_TIMEOUT).unwrap();
    let logs = keel.stderr();
    assert!(!logs.is_empty());
    for line in logs.lines() {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            event["level"].is_string() && event["message"].is_string(),
            "{line}"
        );
    }
}

fn expect_refusal(args: &[&str], needle: &str) -> String {
    let mut keel = KeelProcess::spawn(args).unwrap();
    let status = keel.wait(EXIT_TIMEOUT).unwrap();
    assert!(!status.success(), "keel should refuse to start");
    let stderr = keel.stderr();
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    stderr
}

#[test]
fn refuses_a_port_that_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap();
    expect_refusal(
        &["up", "--listen", &addr, "--state-dir", dir],
        "already in use",
    );
    // Nothing was written: the check runs before the database is opened.
    assert!(!state.path().join("keel.db").exists());
}

#[test]
fn refuses_a_state_dir_that_cannot_be_created() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let below = file.join("state");
    expect_refusal(
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            below.to_str().unwrap(),
        ],
        "cannot be created",
    );
}

#[test]
fn refuses_a_read_only_state_dir() {
    // Root ignores permission bits, so make the directory truly read-only:
    // a read-only tmpfs in a private mount namespace of keel's own.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().to_str().unwrap();
    let script = format!(
        "mount -t tmpfs -o ro tmpfs {mount} && exec {} --log-format json up --listen 127.0.0.1:0 --state-dir {mount}",
        keel_bin().display()
    );
    let output = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("is not writable"), "{stderr}");
    assert!(
        stderr.contains("Read-only file system"),
        "the cause is shown: {stderr}"
    );
}

#[test]
fn refuses_a_state_dir_in_use_by_another_keel() {
    let state = tempfile::tempdir().unwrap();
    let _first = KeelProcess::up(state.path()).unwrap();
    let dir = state.path().to_str().unwrap();
    expect_refusal(
        &["up", "--listen", "127.0.0.1:0", "--state-dir", dir],
        "in use by another keel",
    );
}

#[test]
fn refuses_a_database_from_a_newer_schema_and_leaves_it_alone() {
    let state = tempfile::tempdir().unwrap();
    let mut keel = KeelProcess::up(state.path()).unwrap();
    keel.signal(libc::SIGTERM).unwrap();
    assert!(keel.wait(EXIT_TIMEOUT).unwrap().success());

    let db = state.path().join("keel.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = format!("sqlite://{}", db.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from the future', TRUE, x'00', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    });
    let before = std::fs::read(&db).unwrap();

    let dir = state.path().to_str().unwrap();
    let stderr = expect_refusal(
        &["up", "--listen", "127.0.0.1:0", "--state-dir", dir],
        "schema version 9999",
    );
    assert!(stderr.contains("newer than this keel"), "{stderr}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "database untouched");
}

#[test]
fn refuses_a_state_file_that_is_not_a_keel_database() {
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("keel.db"), vec![0x42; 4096]).unwrap();
    let dir = state.path().to_str().unwrap();
    expect_refusal(
        &["up", "--listen", "127.0.0.1:0", "--state-dir", dir],
        "is not a keel database",
    );
}

#[test]
fn help_lists_every_subcommand_and_version_prints() {
    let out = std::process::Command::new(keel_bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["up", "version", "openapi", "bench"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub} missing from:\n{help}"
        );
    }
    let out = std::process::Command::new(keel_bin())
        .arg("version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("keel {}", env!("CARGO_PKG_VERSION"))
    );
    let out = std::process::Command::new(keel_bin())
        .args(["version", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn bench_writes_a_result_file() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = std::process::Command::new(keel_bin())
        .args([
            "bench",
            "store",
            "--quick",
            "--json",
            json.to_str().unwrap(),
        ])
        .env("KEEL_BENCH_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["suite"], "store");
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(report["machine"]["cpu_model"].is_string());
    assert!(report["machine"]["kernel"].is_string());
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let value = r["value"].as_f64().unwrap();
        let peer = r["peer"]["value"].as_f64().unwrap();
        assert!(value > 0.0 && peer > 0.0, "{r}");
        let ratio = r["ratio"].as_f64().unwrap();
        assert!((ratio - value / peer).abs() <= 1e-9 * (value / peer));
        assert_eq!(r["unit"], "writes/s");
    }
    // The scratch directory is gone.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("out.json")]);

    let out = std::process::Command::new(keel_bin())
        .args(["bench", "nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unknown suite \"nonexistent\" (known: store"),
        "{stderr}"
    );
}
