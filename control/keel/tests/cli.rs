//! The operator CLI against a real `keel up`: login, create with --wait
//! (the task followed over its WebSocket), list as a table and as JSON,
//! clear errors for bad input and for a missing login, delete.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output, Stdio};

use keel_testkit::{keel_bin, KeelProcess};
use serde_json::Value;

fn keel(config: &Path, args: &[&str]) -> Output {
    Command::new(keel_bin())
        .args(args)
        .env("KEEL_CONFIG_DIR", config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(config: &Path, args: &[&str]) -> String {
    let out = keel(config, args);
    assert!(
        out.status.success(),
        "keel {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(config: &Path, args: &[&str]) -> Value {
    let mut argv = args.to_vec();
    argv.push("--json");
    serde_json::from_str(&ok(config, &argv)).unwrap()
}

#[test]
fn operator_cli_logs_in_creates_waits_lists_and_deletes() {
    let state = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let config = config.path();
    let server = KeelProcess::up(state.path()).unwrap();
    let url = server.url("");

    // Without a login every command says what to do.
    let out = keel(config, &["list", "vdcs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keel login"));

    let out = keel(config, &["login", "--url", &url, "--password-stdin"]);
    assert!(!out.status.success(), "empty password refused");
    let password = state.path().join("admin-password");
    let said = ok(
        config,
        &[
            "login",
            "--url",
            &url,
            "--password-file",
            password.to_str().unwrap(),
        ],
    );
    assert!(said.contains("logged in"), "{said}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(config.join("login.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the login file is private");

    let vdc = json(config, &["create", "vdc", "name=acme"]);
    let vdc_id = vdc["id"].as_str().unwrap();
    let table = ok(config, &["list", "vdcs"]);
    assert!(table.contains("acme") && table.contains(vdc_id), "{table}");

    // A create that starts a task: --wait follows it to SUCCEEDED.
    let task = json(
        config,
        &[
            "create",
            "volumes",
            "name=data",
            &format!("vdc_id={vdc_id}"),
            "size_gib=1",
            "--wait",
        ],
    );
    assert_eq!(task["state"], "SUCCEEDED", "{task}");
    let volume = task["resource_id"].as_str().unwrap();
    let shown = json(config, &["show", "volume", volume]);
    assert_eq!(shown["status"], "AVAILABLE", "{shown}");
    assert_eq!(shown["size_bytes"], 1u64 << 30);
    let task = json(
        config,
        &[
            "action",
            "volumes",
            volume,
            "resize",
            "size_gib=2",
            "--wait",
        ],
    );
    assert_eq!(task["state"], "SUCCEEDED", "{task}");
    let shown = json(config, &["show", "volumes", volume]);
    assert_eq!(shown["size_bytes"], 2u64 << 30);
    let listed = json(config, &["list", "volumes", "q=dat"]);
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    let task = json(
        config,
        &[
            "action",
            "volumes",
            volume,
            "copy",
            "name=data-copy",
            "--wait",
        ],
    );
    assert_eq!(task["state"], "SUCCEEDED", "{task}");

    // Backups are made of a volume (`--of`), restore as an action; the
    // volume can go while its backup stays.
    let out = keel(config, &["create", "backups", "name=b1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--of"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task = json(
        config,
        &["create", "backups", "--of", volume, "name=b1", "--wait"],
    );
    assert_eq!(task["state"], "SUCCEEDED", "{task}");
    let backup = task["params"]["backup_id"].as_str().unwrap().to_owned();
    let table = ok(config, &["list", "backups"]);
    assert!(table.contains("b1") && table.contains("full"), "{table}");
    let task = json(
        config,
        &[
            "action",
            "backups",
            &backup,
            "restore",
            "name=from-b1",
            "--wait",
        ],
    );
    assert_eq!(task["state"], "SUCCEEDED", "{task}");
    let out = keel(config, &["create", "vm-backups", "name=v"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("made of a VM"));

    // Identity resources: users by name, custom roles, access rules.
    let users = ok(config, &["list", "users"]);
    assert!(
        users.contains("admin") && users.contains("system-admin"),
        "{users}"
    );
    let role = json(
        config,
        &[
            "create",
            "role",
            "name=net-reader",
            r#"permissions=[{"family":"network","actions":["read"]}]"#,
        ],
    );
    assert_eq!(role["permissions"][0]["family"], "network", "{role}");
    json(
        config,
        &[
            "create",
            "access-rule",
            "name=loopback",
            "cidr=127.0.0.0/8",
            "action=allow",
        ],
    );
    let rules = ok(config, &["list", "access-rules"]);
    assert!(
        rules.contains("127.0.0.0/8") && rules.contains("allow"),
        "{rules}"
    );

    // Bad input: the API's problem, with the field, on stderr; exit code 1.
    let out = keel(
        config,
        &[
            "create",
            "volumes",
            "name=blank",
            &format!("vdc_id={vdc_id}"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("422") && err.contains("size_gib"), "{err}");
    let out = keel(config, &["list", "gizmos"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown resource kind"));

    let said = ok(config, &["delete", "volumes", volume]);
    assert!(said.contains("deleted"), "{said}");
    let out = keel(config, &["show", "volumes", volume]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    let kept_backup = json(config, &["show", "backups", &backup]);
    assert!(kept_backup["parent_id"].is_null(), "{kept_backup}");

    // A VDC with a recycle bin: delete keeps the volume and its file (the
    // agent's file collection leaves it alone), restore brings it back.
    let binned = json(
        config,
        &["create", "vdc", "name=careful", "recycle_bin_hours=24"],
    );
    let binned_vdc = binned["id"].as_str().unwrap();
    let task = json(
        config,
        &[
            "create",
            "volumes",
            "name=keep",
            &format!("vdc_id={binned_vdc}"),
            "size_gib=1",
            "--wait",
        ],
    );
    let kept = task["resource_id"].as_str().unwrap();
    let deleted = json(config, &["delete", "volumes", kept]);
    assert_eq!(deleted["status"], "DELETED", "{deleted}");
    assert!(deleted["purge_at"].as_i64().is_some(), "{deleted}");
    let file = state.path().join("volumes").join(format!("{kept}.raw"));
    // The agent collects the files of volumes that are gone: a stray file
    // shows when a collection pass ran after the delete.
    let stray = state.path().join("volumes").join("stray.raw");
    std::fs::write(&stray, b"no volume has this file").unwrap();
    let start = std::time::Instant::now();
    while stray.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "no collection pass removed the stray file"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(file.exists(), "a binned volume keeps its file");
    let restored = json(config, &["action", "volumes", kept, "restore"]);
    assert_eq!(restored["status"], "AVAILABLE", "{restored}");
}
