//! The served OpenAPI document against the real server, by schemathesis
//! (from PyPI): generated requests for every operation must never get a
//! server error, and every answer must match the document (status codes,
//! content types, response schemas).
//!
//! Left out: login (fuzzing it locks the admin account, by design),
//! consoles and the two streams (WebSocket / SSE, which schemathesis does
//! not model).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;

use keel_testkit::KeelProcess;
use serde_json::{json, Value};

const VERSION: &str = "4.32.5";

/// A virtualenv with schemathesis, kept across runs in the user's cache.
fn schemathesis() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap();
    let venv = PathBuf::from(home)
        .join(".cache/keel")
        .join(format!("schemathesis-{VERSION}"));
    let bin = venv.join("bin/schemathesis");
    if !bin.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv (Debian: python3-venv)");
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", &format!("schemathesis=={VERSION}")])
            .status()
            .unwrap();
        assert!(pip.success(), "pip install schemathesis=={VERSION}");
    }
    bin
}

#[test]
fn schemathesis_finds_no_server_error_or_schema_violation() {
    let bin = schemathesis();
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();
    let password = std::fs::read_to_string(state.path().join("admin-password")).unwrap();
    let login: Value = ureq::post(&keel.url("/api/v1/auth/login"))
        .send_json(json!({"username": "admin", "password": password.trim()}))
        .unwrap()
        .into_json()
        .unwrap();
    let token = login["access_token"].as_str().unwrap();
    let out = Command::new(bin)
        .arg("run")
        .arg(keel.url("/api/v1/openapi.json"))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "5",
            "--generation-deterministic",
            "--exclude-path-regex",
            "/auth/login|/console|/events/stream|/watch",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
}
