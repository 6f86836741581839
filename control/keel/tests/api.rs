//! The management API against the real `keel` binary: first-start
//! bootstrap, login over HTTP, and a crash test (kill -9 during a stream
//! of creates loses no acknowledged create).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_testkit::KeelProcess;
use serde_json::{json, Value};

const EXIT_TIMEOUT: Duration = Duration::from_secs(90);

fn send(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(30));
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
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

fn login(keel: &KeelProcess, password: &str) -> String {
    let (status, body) = send(
        "POST",
        &keel.url("/api/v1/auth/login"),
        None,
        Some(json!({"username": "admin", "password": password})),
    );
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn admin_password(state: &std::path::Path) -> String {
    std::fs::read_to_string(state.join("admin-password"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn first_start_creates_admin_with_a_private_password_file() {
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();
    let file = state.path().join("admin-password");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let password = admin_password(state.path());
    let logs = keel.stderr();
    assert!(
        logs.contains("admin-password"),
        "the path is logged: {logs}"
    );
    assert!(!logs.contains(&password), "the password is never logged");

    // Everything but health, version and the spec needs a token.
    assert_eq!(send("GET", &keel.url("/api/v1/vdcs"), None, None).0, 401);
    let token = login(&keel, &password);
    let (status, vdc) = send(
        "POST",
        &keel.url("/api/v1/vdcs"),
        Some(&token),
        Some(json!({"name": "acme", "quota": {"networks": 4}})),
    );
    assert_eq!(status, 201, "{vdc}");
    let (status, vpc) = send(
        "POST",
        &keel.url("/api/v1/vpcs"),
        Some(&token),
        Some(json!({"name": "net", "vdc_id": vdc["id"]})),
    );
    assert_eq!(status, 201, "{vpc}");
    assert_eq!(vpc["status"], "PENDING");

    // A restart keeps the admin and does not rewrite its password.
    drop(keel);
    let keel = KeelProcess::up(state.path()).unwrap();
    assert_eq!(admin_password(state.path()), password);
    let token = login(&keel, &password);
    let (_, vpcs) = send("GET", &keel.url("/api/v1/vpcs"), Some(&token), None);
    assert_eq!(vpcs["items"][0]["id"], vpc["id"]);
}

#[test]
fn kill_9_during_creates_loses_no_acknowledged_resource() {
    let state = tempfile::tempdir().unwrap();
    let mut keel = KeelProcess::up(state.path()).unwrap();
    let token = login(&keel, &admin_password(state.path()));
    let (_, vdc) = send(
        "POST",
        &keel.url("/api/v1/vdcs"),
        Some(&token),
        Some(json!({"name": "acme"})),
    );
    let vdc_id = vdc["id"].as_str().unwrap().to_owned();

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, stop) = (acked.clone(), stop.clone());
            let (url, token, vdc_id) = (keel.url("/api/v1/vpcs"), token.clone(), vdc_id.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let response = ureq::post(&url)
                        .set("authorization", &format!("Bearer {token}"))
                        .timeout(Duration::from_secs(30))
                        .send_json(json!({"name": format!("w{w}-{i}"), "vdc_id": vdc_id}));
                    match response {
                        Ok(r) if r.status() == 201 => {
                            let body: Value = r.into_json().unwrap();
                            acked
                                .lock()
                                .unwrap()
                                .push(body["id"].as_str().unwrap().to_owned());
                        }
                        // The process died mid-request: not acknowledged.
                        _ => break,
                    }
                }
            })
        })
        .collect();
    // Kill while the writers are still going.
    while acked.lock().unwrap().len() < 60 && !writers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    keel.signal(libc::SIGKILL).unwrap();
    keel.wait(EXIT_TIMEOUT).unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 60,
        "writers stopped early: {}",
        keel.stderr()
    );
    eprintln!("{} creates acknowledged before kill -9", acked.len());

    let keel = KeelProcess::up(state.path()).unwrap();
    let token = login(&keel, &admin_password(state.path()));
    let mut stored = std::collections::HashSet::new();
    let mut url = keel.url("/api/v1/vpcs?limit=1000");
    loop {
        let (status, page) = send("GET", &url, Some(&token), None);
        assert_eq!(status, 200);
        for item in page["items"].as_array().unwrap() {
            stored.insert(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => url = keel.url(&format!("/api/v1/vpcs?limit=1000&cursor={c}")),
            None => break,
        }
    }
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged creates lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    // Each stored VPC has its creation event (same transaction).
    let mut created = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let url = keel.url(&format!("/api/v1/events?after={after}"));
        let (_, events) = send("GET", &url, Some(&token), None);
        let events = events.as_array().unwrap();
        let Some(last) = events.last() else { break };
        after = last["seq"].as_i64().unwrap();
        created.extend(
            events
                .iter()
                .filter(|e| e["resource_type"] == "vpc")
                .map(|e| e["resource_id"].as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(created, stored);
    assert!(keel.stderr().contains("did not shut down cleanly"));
}

#[test]
fn event_feed_over_websocket_replays_then_pushes_live_changes() {
    use tungstenite::client::IntoClientRequest;
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();
    let token = login(&keel, &admin_password(state.path()));
    let (status, before) = send(
        "POST",
        &keel.url("/api/v1/vdcs"),
        Some(&token),
        Some(json!({"name": "before"})),
    );
    assert_eq!(status, 201, "{before}");
    let url = keel
        .url("/api/v1/events/watch?after=0")
        .replace("http://", "ws://");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let mut next_for = |id: &str| -> Value {
        loop {
            match ws.read().unwrap() {
                tungstenite::Message::Text(t) => {
                    let event: Value = serde_json::from_str(&t).unwrap();
                    if event["resource_id"] == id {
                        return event;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    // Replayed from the start, then a change made after connecting.
    let replayed = next_for(before["id"].as_str().unwrap());
    assert_eq!(replayed["action"], "created");
    let (status, live) = send(
        "POST",
        &keel.url("/api/v1/vdcs"),
        Some(&token),
        Some(json!({"name": "live"})),
    );
    assert_eq!(status, 201, "{live}");
    let pushed = next_for(live["id"].as_str().unwrap());
    assert_eq!(pushed["resource_type"], "vdc");
    assert!(pushed["seq"].as_i64().unwrap() > replayed["seq"].as_i64().unwrap());
    // Without a token there is no feed.
    let anonymous = keel.url("/api/v1/events/watch").replace("http://", "ws://");
    match tungstenite::connect(anonymous) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("anonymous watch: {:?}", other.map(|_| ())),
    }
}

/// Polls `check` until it gives a value; the bound on polls is a hang
/// guard only, not a timing requirement.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..720 {
        if let Some(v) = check() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{what}: still not after 720 polls");
}

/// A VDC and a 1 GiB volume in it, made by the agent: `(vdc, volume id)`.
fn vdc_with_volume(keel: &KeelProcess, token: &str) -> (Value, String) {
    let (_, vdc) = send(
        "POST",
        &keel.url("/api/v1/vdcs"),
        Some(token),
        Some(json!({"name": "acme"})),
    );
    let (status, task) = send(
        "POST",
        &keel.url("/api/v1/volumes"),
        Some(token),
        Some(json!({"name": "data", "vdc_id": vdc["id"], "size_gib": 1})),
    );
    assert_eq!(status, 202, "{task}");
    wait_task(keel, token, &task);
    (vdc, task["resource_id"].as_str().unwrap().to_owned())
}

/// Polls a task until it finishes.
fn wait_task(keel: &KeelProcess, token: &str, task: &Value) -> Value {
    let url = keel.url(&format!("/api/v1/tasks/{}", task["id"].as_str().unwrap()));
    eventually("task finished", || {
        let (_, t) = send("GET", &url, Some(token), None);
        match t["state"].as_str().unwrap() {
            "SUCCEEDED" => Some(t),
            "FAILED" => panic!("task failed: {t}"),
            _ => None,
        }
    })
}

#[test]
fn volume_copy_carries_the_data_and_keeps_holes() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();
    let token = login(&keel, &admin_password(state.path()));
    let (_, source) = vdc_with_volume(&keel, &token);
    let file = |id: &str| state.path().join("volumes").join(format!("{id}.raw"));
    let marker = b"KEEL-COPY-MARKER";
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(file(&source))
            .unwrap();
        f.seek(SeekFrom::Start(512 << 20)).unwrap();
        f.write_all(marker).unwrap();
        f.sync_all().unwrap();
    }

    let copy_url = keel.url(&format!("/api/v1/volumes/{source}/actions/copy"));
    let (status, body) = send("POST", &copy_url, Some(&token), Some(json!({"name": ""})));
    assert_eq!(status, 422, "{body}");
    let (status, body) = send(
        "POST",
        &keel.url("/api/v1/volumes/nope/actions/copy"),
        Some(&token),
        Some(json!({"name": "x"})),
    );
    assert_eq!(status, 404, "{body}");
    let (status, task) = send(
        "POST",
        &copy_url,
        Some(&token),
        Some(json!({"name": "dup"})),
    );
    assert_eq!(status, 202, "{task}");
    wait_task(&keel, &token, &task);
    let copy = task["resource_id"].as_str().unwrap();
    let (_, volume) = send(
        "GET",
        &keel.url(&format!("/api/v1/volumes/{copy}")),
        Some(&token),
        None,
    );
    assert_eq!(volume["status"], "AVAILABLE", "{volume}");
    assert_eq!(volume["size_bytes"], 1u64 << 30);
    let mut f = std::fs::File::open(file(copy)).unwrap();
    let mut got = [0u8; 16];
    f.seek(SeekFrom::Start(512 << 20)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert_eq!(&got, marker);
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "holes kept: {} blocks",
        meta.blocks()
    );
}

#[test]
fn backup_policy_takes_its_first_backup_through_the_agent() {
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();
    let token = login(&keel, &admin_password(state.path()));
    let (vdc, volume) = vdc_with_volume(&keel, &token);
    let volume = volume.as_str();
    let (status, policy) = send(
        "POST",
        &keel.url("/api/v1/backup-policies"),
        Some(&token),
        Some(
            json!({"name": "hourly", "vdc_id": vdc["id"], "volume_ids": [volume],
                    "interval_seconds": 3600, "retention": 24}),
        ),
    );
    assert_eq!(status, 201, "{policy}");
    // The agent runs a due policy within its loop.
    let backup = eventually("the policy's first backup", || {
        let (_, page) = send(
            "GET",
            &keel.url(&format!("/api/v1/backups?parent_id={volume}")),
            Some(&token),
            None,
        );
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["status"] == "AVAILABLE")
            .cloned()
    });
    assert_eq!(backup["policy_id"], policy["id"], "{backup}");
    assert_eq!(
        backup["kind"], "full",
        "the first backup of a volume is full"
    );
    let (_, p) = send(
        "GET",
        &keel.url(&format!(
            "/api/v1/backup-policies/{}",
            policy["id"].as_str().unwrap()
        )),
        Some(&token),
        None,
    );
    assert!(
        p["last_result"].as_str().unwrap().contains("backup queued"),
        "{p}"
    );
    assert!(p["next_run_at"].as_i64().unwrap() > p["last_run_at"].as_i64().unwrap());
}

#[test]
fn a_vdc_that_encrypts_backups_keeps_their_data_unreadable_in_the_repository() {
    use std::io::{Seek, SeekFrom, Write};
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();
    let token = login(&keel, &admin_password(state.path()));
    let (vdc, volume) = vdc_with_volume(&keel, &token);
    let vdc_url = keel.url(&format!("/api/v1/vdcs/{}", vdc["id"].as_str().unwrap()));
    assert_eq!(vdc["backup_encryption"], false, "{vdc}");
    let etag = format!("\"{}\"", vdc["revision"]);
    let r = ureq::request("PATCH", &vdc_url)
        .set("authorization", &format!("Bearer {token}"))
        .set("if-match", &etag)
        .send_json(json!({"backup_encryption": true}))
        .unwrap();
    let vdc: Value = r.into_json().unwrap();
    assert_eq!(vdc["backup_encryption"], true, "{vdc}");
    assert!(
        vdc.get("backup_key").is_none(),
        "the key is never shown: {vdc}"
    );
    // Data the repository must not show.
    let marker = b"KEEL-TENANT-SECRET ";
    let file = state.path().join("volumes").join(format!("{volume}.raw"));
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.write_all(&marker.repeat(50_000)).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let backup = |name: &str| -> Value {
        let (status, task) = send(
            "POST",
            &keel.url(&format!("/api/v1/volumes/{volume}/backups")),
            Some(&token),
            Some(json!({"name": name})),
        );
        assert_eq!(status, 202, "{task}");
        let done = wait_task(&keel, &token, &task);
        let id = done["params"]["backup_id"].as_str().unwrap();
        send(
            "GET",
            &keel.url(&format!("/api/v1/backups/{id}")),
            Some(&token),
            None,
        )
        .1
    };
    let sealed = backup("sealed");
    assert_eq!(sealed["status"], "AVAILABLE", "{sealed}");
    let fingerprint = sealed["encryption"].as_str().unwrap().to_owned();
    assert_eq!(fingerprint.len(), 16, "{sealed}");
    let chunks = state.path().join("backups").join("chunks");
    let mut stored = 0;
    for shard in std::fs::read_dir(&chunks).unwrap() {
        for chunk in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let bytes = std::fs::read(chunk.unwrap().path()).unwrap();
            assert!(!bytes.windows(marker.len()).any(|w| w == marker));
            stored += 1;
        }
    }
    assert!(stored > 0);

    // Turned off: new backups are plain, and the encrypted one still
    // restores with the key the VDC kept.
    let (_, vdc) = send("GET", &vdc_url, Some(&token), None);
    let etag = format!("\"{}\"", vdc["revision"]);
    ureq::request("PATCH", &vdc_url)
        .set("authorization", &format!("Bearer {token}"))
        .set("if-match", &etag)
        .send_json(json!({"backup_encryption": false}))
        .unwrap();
    let plain = backup("plain");
    assert!(plain["encryption"].is_null(), "{plain}");
    let original = std::fs::read(&file).unwrap();

    // In place: the volume's own file goes back to the encrypted point.
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.write_all(&[0xee; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (status, task) = send(
        "POST",
        &keel.url(&format!(
            "/api/v1/backups/{}/actions/restore",
            sealed["id"].as_str().unwrap()
        )),
        Some(&token),
        Some(json!({"in_place": true})),
    );
    assert_eq!(status, 202, "{task}");
    assert_eq!(task["resource_id"], volume.as_str(), "{task}");
    wait_task(&keel, &token, &task);
    assert!(
        std::fs::read(&file).unwrap() == original,
        "restored in place"
    );
    let (status, task) = send(
        "POST",
        &keel.url(&format!(
            "/api/v1/backups/{}/actions/restore",
            sealed["id"].as_str().unwrap()
        )),
        Some(&token),
        Some(json!({"name": "unsealed"})),
    );
    assert_eq!(status, 202, "{task}");
    wait_task(&keel, &token, &task);
    let restored = state
        .path()
        .join("volumes")
        .join(format!("{}.raw", task["resource_id"].as_str().unwrap()));
    assert!(
        std::fs::read(&restored).unwrap() == original,
        "the encrypted backup restores the volume exactly"
    );
}
