//! keel on a shared PostgreSQL database, as a cloud of many hosts runs it:
//! a host (`keel up --database postgres://…`, with its host agent) and an
//! API node (`--no-host-agent`) on one real PostgreSQL server. What one
//! process writes the other serves; writers from both are serialized (one
//! name wins a race, the change feed has every change once, in order); an
//! idempotent retry may land on either; a task accepted by the API node is
//! run by the host's agent; runs are per node; kill -9 of either process
//! loses nothing acknowledged; with a second host agent the work goes on
//! while the first is down, which heartbeats report; bad URLs are refused.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use keel_testkit::{KeelProcess, PostgresServer};
use serde_json::{json, Value};

const POLL: Duration = Duration::from_millis(250);
/// Hang guard of every wait (a few minutes of polls).
const MAX_POLLS: u32 = 720;
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);
/// Creates per node in the concurrent phase.
const CREATES: usize = 15;

#[derive(Clone)]
struct Api {
    base: String,
    token: String,
}

impl Api {
    fn login(keel: &KeelProcess, password: &str) -> Api {
        let base = keel.url("");
        let mut api = Api {
            base,
            token: String::new(),
        };
        let (status, body) = api.send(
            "POST",
            "/api/v1/auth/login",
            &[],
            Some(json!({"username": "admin", "password": password})),
        );
        assert_eq!(status, 200, "{body}");
        api.token = body["access_token"].as_str().unwrap().to_owned();
        api
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        self.attempt(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// As [`Api::send`]; a connection that breaks is an error, not a panic.
    fn attempt(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<(u16, Value), Box<ureq::Error>> {
        let url = format!("{}{path}", self.base);
        let mut req = ureq::request(method, &url).timeout(Duration::from_secs(60));
        if !self.token.is_empty() {
            req = req.set("authorization", &format!("Bearer {}", self.token));
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let response = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(Box::new(e)),
        };
        Ok((
            response.status(),
            response.into_json().unwrap_or(Value::Null),
        ))
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.send(method, path, &[], body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {value}"
        );
        value
    }

    /// Every item of a paged list, following `next_cursor`.
    fn all(&self, path: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = match &cursor {
                Some(c) => self.ok("GET", &format!("{path}?limit=7&cursor={c}"), None),
                None => self.ok("GET", &format!("{path}?limit=7"), None),
            };
            items.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return items,
            }
        }
    }

    fn wait_task(&self, task: &Value) -> Value {
        let id = task["id"].as_str().unwrap();
        eventually(&format!("task {id} finished"), || {
            let t = self.ok("GET", &format!("/api/v1/tasks/{id}"), None);
            match t["state"].as_str().unwrap() {
                "SUCCEEDED" => Some(t),
                "FAILED" => panic!("task {} failed: {}", t["action"], t["message"]),
                _ => None,
            }
        })
    }
}

fn password(state: &Path) -> String {
    std::fs::read_to_string(state.join("admin-password"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn host_and_api_node_share_one_postgresql_database() {
    let pg = PostgresServer::start().unwrap();
    let url = pg.url();
    let host_dir = tempfile::tempdir().unwrap();
    let node_dir = tempfile::tempdir().unwrap();
    let mut host = KeelProcess::up_with(host_dir.path(), &["--database", &url]).unwrap();
    let node =
        KeelProcess::up_with(node_dir.path(), &["--database", &url, "--no-host-agent"]).unwrap();
    // One admin for the cloud, made by the first process; no SQLite file.
    assert!(!node_dir.path().join("admin-password").exists());
    assert!(!host_dir.path().join("keel.db").exists());
    assert!(!node_dir.path().join("keel.db").exists());
    let pw = password(host_dir.path());
    let a = Api::login(&host, &pw);
    let b = Api::login(&node, &pw);
    let va = a.ok("GET", "/api/v1/version", None);
    let vb = b.ok("GET", "/api/v1/version", None);
    assert_eq!(
        va["instance_id"], vb["instance_id"],
        "one cloud, one identity"
    );
    assert_eq!(va["schema_version"], vb["schema_version"]);
    let newest: i64 = pg
        .psql("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(va["schema_version"], newest);

    // What one process writes the other serves, revisions included.
    let before: i64 = pg
        .psql("SELECT COALESCE(MAX(seq), 0) FROM events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let vdc = a.ok("POST", "/api/v1/vdcs", Some(json!({"name": "shared"})));
    let vdc_id = vdc["id"].as_str().unwrap().to_owned();
    let seen = b.ok("GET", &format!("/api/v1/vdcs/{vdc_id}"), None);
    assert_eq!(seen["name"], "shared");
    let etag = format!("\"{}\"", seen["revision"]);
    let (status, updated) = b.send(
        "PATCH",
        &format!("/api/v1/vdcs/{vdc_id}"),
        &[("If-Match", &etag)],
        Some(json!({"description": "changed on the API node"})),
    );
    assert_eq!(status, 200, "{updated}");
    // The host still holds the old revision: its update is refused.
    let (status, body) = a.send(
        "PATCH",
        &format!("/api/v1/vdcs/{vdc_id}"),
        &[("If-Match", &etag)],
        Some(json!({"description": "stale"})),
    );
    assert_eq!(status, 412, "{body}");
    let now = a.ok("GET", &format!("/api/v1/vdcs/{vdc_id}"), None);
    assert_eq!(now["description"], "changed on the API node");
    assert_eq!(now["revision"], updated["revision"]);

    // Writers on both processes at once: nothing lost, nothing doubled.
    let created: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = [(&a, "a"), (&b, "b")]
            .into_iter()
            .map(|(api, tag)| {
                s.spawn(move || {
                    (0..CREATES)
                        .map(|i| {
                            let v = api.ok(
                                "POST",
                                "/api/v1/vdcs",
                                Some(json!({"name": format!("busy-{tag}-{i:02}")})),
                            );
                            v["id"].as_str().unwrap().to_owned()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(created.len(), 2 * CREATES);
    let listed: HashSet<String> = b
        .all("/api/v1/vdcs")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &created {
        assert!(listed.contains(id), "{id} missing from the list");
    }
    let busy = b.ok("GET", "/api/v1/vdcs?q=BUSY-A&limit=100", None);
    assert_eq!(busy["items"].as_array().unwrap().len(), CREATES, "{busy}");

    // The change feed, read through either process: every create once, in
    // commit order.
    let events = a.ok(
        "GET",
        &format!("/api/v1/events?after={before}&limit=500"),
        None,
    );
    let events = events.as_array().unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for id in &created {
        let n = events
            .iter()
            .filter(|e| e["resource_id"] == id.as_str() && e["action"] == "created")
            .count();
        assert_eq!(n, 1, "created event of {id}");
    }
    let via_b = b.ok(
        "GET",
        &format!("/api/v1/events?after={before}&limit=500"),
        None,
    );
    assert_eq!(via_b.as_array().unwrap().len(), events.len());

    // The same user name created on both at once: exactly one wins each time.
    for round in 0..5 {
        let name = format!("racer{round}");
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let racers: Vec<_> = [&a, &b]
                .into_iter()
                .map(|api| {
                    let name = name.clone();
                    let vdc_id = vdc_id.clone();
                    s.spawn(move || {
                        api.send(
                            "POST",
                            "/api/v1/users",
                            &[],
                            Some(json!({"name": name, "password": "Tortoise-pass-0123",
                                        "role": "vdc-admin", "vdc_id": vdc_id})),
                        )
                        .0
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let mut sorted = statuses.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [201, 409], "round {round}: {statuses:?}");
    }

    // An idempotent retry may land on the other process.
    let key = [("Idempotency-Key", "pg-retry-1")];
    let body = json!({"name": "retried"});
    let (s1, first) = a.send("POST", "/api/v1/vdcs", &key, Some(body.clone()));
    let (s2, again) = b.send("POST", "/api/v1/vdcs", &key, Some(body));
    assert_eq!((s1, s2), (201, 201), "{first} {again}");
    assert_eq!(first["id"], again["id"], "replayed, not created twice");

    // Ports on a /29 through both processes: the store picks free addresses
    // and unique MACs from the JSON specs, then reports the pool exhausted.
    let vpc = a.ok(
        "POST",
        "/api/v1/vpcs",
        Some(json!({"name": "n", "vdc_id": vdc_id})),
    );
    let subnet = b.ok(
        "POST",
        "/api/v1/subnets",
        Some(json!({"name": "s", "vpc_id": vpc["id"], "cidr": "10.0.0.0/29"})),
    );
    let mut ips = HashSet::new();
    let mut macs = HashSet::new();
    for i in 0..5 {
        let api = if i % 2 == 0 { &a } else { &b };
        let port = api.ok(
            "POST",
            "/api/v1/ports",
            Some(json!({"name": format!("p{i}"), "subnet_id": subnet["id"]})),
        );
        assert!(
            ips.insert(port["fixed_ip"].as_str().unwrap().to_owned()),
            "{port}"
        );
        assert!(
            macs.insert(port["mac_address"].as_str().unwrap().to_owned()),
            "{port}"
        );
    }
    let (status, body) = b.send(
        "POST",
        "/api/v1/ports",
        &[],
        Some(json!({"name": "full", "subnet_id": subnet["id"]})),
    );
    assert_eq!(status, 409, "{body}");

    // A task accepted by the API node is run by the host's agent.
    let (status, task) = b.send(
        "POST",
        "/api/v1/volumes",
        &[],
        Some(json!({"name": "via-node", "vdc_id": vdc_id, "size_gib": 1})),
    );
    assert_eq!(status, 202, "{task}");
    b.wait_task(&task);
    let volume_id = task["resource_id"].as_str().unwrap();
    let volume = b.ok("GET", &format!("/api/v1/volumes/{volume_id}"), None);
    assert_eq!(volume["status"], "AVAILABLE", "{volume}");
    let on_host = walk(host_dir.path())
        .iter()
        .any(|p| p.to_string_lossy().contains(volume_id));
    assert!(on_host, "the volume file is on the host");
    assert!(!walk(node_dir.path())
        .iter()
        .any(|p| p.to_string_lossy().contains(volume_id)));
    // Deleted through the API node: the host's agent removes the file.
    let (status, kept) = b.send(
        "POST",
        "/api/v1/volumes",
        &[],
        Some(json!({"name": "to-delete", "vdc_id": vdc_id, "size_gib": 1})),
    );
    assert_eq!(status, 202, "{kept}");
    b.wait_task(&kept);
    let doomed = kept["resource_id"].as_str().unwrap().to_owned();
    let read = b.ok("GET", &format!("/api/v1/volumes/{doomed}"), None);
    let etag = format!("\"{}\"", read["revision"]);
    let (status, body) = b.send(
        "DELETE",
        &format!("/api/v1/volumes/{doomed}"),
        &[("If-Match", &etag)],
        None,
    );
    assert_eq!(status, 204, "{body}");
    eventually("the deleted volume's file gone from the host", || {
        let left = walk(host_dir.path())
            .iter()
            .any(|p| p.to_string_lossy().contains(&doomed));
        (!left).then_some(())
    });

    // Runs are per node: restarting the host neither reports nor closes the
    // API node's run.
    host.signal(libc::SIGTERM).unwrap();
    assert!(
        host.wait(EXIT_TIMEOUT).unwrap().success(),
        "{}",
        host.stderr()
    );
    b.ok("GET", &format!("/api/v1/vdcs/{vdc_id}"), None);
    let host = KeelProcess::up_with(host_dir.path(), &["--database", &url]).unwrap();
    assert!(
        !host.stderr().contains("did not shut down cleanly"),
        "{}",
        host.stderr()
    );
    let runs = pg
        .psql("SELECT COUNT(*) FILTER (WHERE stopped_at IS NULL), COUNT(*) FILTER (WHERE stopped_at = -1) FROM runs")
        .unwrap();
    assert_eq!(
        runs.trim(),
        "2|0",
        "one open run per node, none closed as crashed"
    );
    let a = Api::login(&host, &pw);
    assert_eq!(
        a.ok("GET", &format!("/api/v1/volumes/{volume_id}"), None)["status"],
        "AVAILABLE"
    );

    // kill -9 of the API node in the middle of writes (some of them holding
    // the write lock): the host goes on writing, and every create the node
    // acknowledged is stored with its event.
    let mut node = node;
    let acked = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for i in 0.. {
                let sent = b.attempt(
                    "POST",
                    "/api/v1/vpcs",
                    &[],
                    Some(json!({"name": format!("k{i}"), "vdc_id": vdc_id})),
                );
                // The process died mid-request: not acknowledged.
                let Ok((201, v)) = sent else { break };
                acked
                    .lock()
                    .unwrap()
                    .push(v["id"].as_str().unwrap().to_owned());
            }
        });
        while acked.lock().unwrap().len() < 20 && !writer.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        node.signal(libc::SIGKILL).unwrap();
        node.wait(EXIT_TIMEOUT).unwrap();
    });
    let acked = acked.into_inner().unwrap();
    assert!(acked.len() >= 20, "writer stopped early: {}", node.stderr());
    a.ok("POST", "/api/v1/vdcs", Some(json!({"name": "after-kill"})));
    let stored: HashSet<String> = a
        .all("/api/v1/vpcs")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged creates lost: {lost:?}");

    // A second host agent joins. kill -9 of the first host: the second takes
    // the work accepted meanwhile, the first is reported not responding
    // once its heartbeat expires, and responding again after its restart.
    let node =
        KeelProcess::up_with(node_dir.path(), &["--database", &url, "--no-host-agent"]).unwrap();
    assert!(
        node.stderr().contains("did not shut down cleanly"),
        "the killed node's run is reported by its own next start"
    );
    let b = Api::login(&node, &pw);
    let c_dir = tempfile::tempdir().unwrap();
    let _second =
        KeelProcess::up_with(c_dir.path(), &["--database", &url, "--host-id", "host-c"]).unwrap();
    let first_host = eventually("both hosts responding", || {
        let hosts = b.ok("GET", "/api/v1/hosts", None);
        let items = hosts["items"].as_array().unwrap().clone();
        let all = items.len() == 2 && items.iter().all(|h| h["responding"] == true);
        all.then(|| {
            items.iter().find(|h| h["id"] != "host-c").unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
    });
    let mut host = host;
    host.signal(libc::SIGKILL).unwrap();
    host.wait(EXIT_TIMEOUT).unwrap();
    let accepted: Vec<Value> = (0..3)
        .map(|i| {
            let (status, task) = b.send(
                "POST",
                "/api/v1/volumes",
                &[],
                Some(json!({"name": format!("while-down-{i}"), "vdc_id": vdc_id, "size_gib": 1})),
            );
            assert_eq!(status, 202, "{task}");
            task
        })
        .collect();
    for task in &accepted {
        b.wait_task(task);
        let id = task["resource_id"].as_str().unwrap();
        let volume = b.ok("GET", &format!("/api/v1/volumes/{id}"), None);
        assert_eq!(volume["status"], "AVAILABLE", "{volume}");
        let on_c = walk(c_dir.path())
            .iter()
            .any(|p| p.to_string_lossy().contains(id));
        assert!(on_c, "made by the host that is up");
        assert_eq!(
            volume["host_id"], "host-c",
            "the volume says where its file is"
        );
    }
    // A copy runs where the source's file is, even when another host could
    // take the task first.
    let source = accepted[0]["resource_id"].as_str().unwrap();
    let (status, copy) = b.send(
        "POST",
        &format!("/api/v1/volumes/{source}/actions/copy"),
        &[],
        Some(json!({"name": "copied"})),
    );
    assert_eq!(status, 202, "{copy}");
    assert_eq!(copy["host_id"], "host-c", "{copy}");
    eventually("the killed host reported not responding", || {
        let h = b.ok("GET", &format!("/api/v1/hosts/{first_host}"), None);
        (h["responding"] == false).then_some(())
    });
    let _host = KeelProcess::up_with(host_dir.path(), &["--database", &url]).unwrap();
    eventually("the restarted host responding", || {
        let h = b.ok("GET", &format!("/api/v1/hosts/{first_host}"), None);
        (h["responding"] == true).then_some(())
    });
}

/// Polls `check` until it gives a value. The bound on polls is a hang
/// guard only (heartbeats expire after 20 s), not a timing requirement.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..MAX_POLLS {
        if let Some(v) = check() {
            return v;
        }
        std::thread::sleep(POLL);
    }
    panic!("{what}: still not after {MAX_POLLS} polls");
}

#[test]
fn database_urls_that_cannot_work_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    for (url, expect) in [
        ("mysql://root@127.0.0.1/keel", "not supported"),
        (
            "postgres://keel:secret@127.0.0.1:1/keel",
            "Cannot open state database",
        ),
    ] {
        let mut keel = KeelProcess::spawn(&[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            &d,
            "--database",
            url,
        ])
        .unwrap();
        let status = keel.wait(EXIT_TIMEOUT).unwrap();
        let err = keel.stderr();
        assert!(!status.success(), "{url}: {err}");
        assert!(err.contains(expect), "{url}: {err}");
        assert!(!err.contains("secret"), "password leaked: {err}");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// A new compute host joins with nothing but the control plane's address
/// and a system admin's API token (the appliance takes both from its boot
/// configuration): it is told the shared database, its agent registers the
/// host, which becomes schedulable; it keeps what it was told, so it comes
/// back while the control plane's API is down. Wrong tokens and a control
/// plane on an embedded SQLite file are refused with the reason.
#[test]
fn a_new_host_joins_with_an_api_token() {
    let pg = PostgresServer::start().unwrap();
    let url = pg.url();
    let cp_dir = tempfile::tempdir().unwrap();
    let mut cp =
        KeelProcess::up_with(cp_dir.path(), &["--database", &url, "--no-host-agent"]).unwrap();
    let api = Api::login(&cp, &password(cp_dir.path()));
    let token = api.ok("POST", "/api/v1/tokens", Some(json!({"name": "host-join"})));
    let token = token["token"].as_str().unwrap().to_owned();

    let host_dir = tempfile::tempdir().unwrap();
    let cp_url = cp.url("");
    let args = [
        "--join",
        &cp_url,
        "--join-token",
        &token,
        "--host-id",
        "joined-1",
    ];
    let mut host = KeelProcess::up_with(host_dir.path(), &args).unwrap();
    let joined = eventually("the joined host registered and beats", || {
        let (status, h) = api.send("GET", "/api/v1/hosts/joined-1", &[], None);
        (status == 200 && h["responding"] == true).then_some(h)
    });
    assert_eq!(joined["status"], "ENABLED", "{joined}");
    assert!(joined["cores"].as_u64().unwrap() > 0, "{joined}");
    assert!(!joined["cpu_arch"].as_str().unwrap().is_empty(), "{joined}");
    // The host serves the same cloud's API.
    let version = |k: &KeelProcess| -> Value {
        ureq::get(&k.url("/api/v1/version"))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let cloud = version(&cp)["instance_id"].clone();
    assert_eq!(version(&host)["instance_id"], cloud);
    // What it was told is kept for root only (it holds the database password).
    let kept = host_dir.path().join("join.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let kept: Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert_eq!(kept["database_url"], url.as_str());

    // The audit log names who enrolled a host.
    let audit = api.ok("GET", "/api/v1/audit", None);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/api/v1/hosts/enroll" && e["status"] == 200),
        "{audit}"
    );

    // A wrong token: refused, with the control plane's reason.
    let other_dir = tempfile::tempdir().unwrap();
    let refused = |dir: &Path, api_url: String, token: &str| -> String {
        let d = dir.to_string_lossy().into_owned();
        let mut keel = KeelProcess::spawn(&[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            &d,
            "--join",
            &api_url,
            "--join-token",
            token,
        ])
        .unwrap();
        let status = keel.wait(EXIT_TIMEOUT).unwrap();
        assert!(!status.success(), "{}", keel.stderr());
        keel.stderr()
    };
    let err = refused(other_dir.path(), cp.url(""), "keelt-not-a-token");
    assert!(err.contains("refused this host (HTTP 401)"), "{err}");

    // The control plane goes away; the host restarts on the kept database.
    host.signal(libc::SIGTERM).unwrap();
    assert!(host.wait(EXIT_TIMEOUT).unwrap().success());
    cp.signal(libc::SIGTERM).unwrap();
    assert!(cp.wait(EXIT_TIMEOUT).unwrap().success());
    let host = KeelProcess::up_with(host_dir.path(), &args).unwrap();
    assert!(
        host.stderr()
            .contains("unreachable: using the database of the last join"),
        "{}",
        host.stderr()
    );
    assert_eq!(version(&host)["instance_id"], cloud);

    // A control plane on an embedded SQLite file has no database to share.
    let lone_dir = tempfile::tempdir().unwrap();
    let lone = KeelProcess::up(lone_dir.path()).unwrap();
    let lone_api = Api::login(&lone, &password(lone_dir.path()));
    let lone_token = lone_api.ok("POST", "/api/v1/tokens", Some(json!({"name": "j"})));
    let err = refused(
        tempfile::tempdir().unwrap().path(),
        lone.url(""),
        lone_token["token"].as_str().unwrap(),
    );
    assert!(
        err.contains("HTTP 409") && err.contains("embedded SQLite"),
        "{err}"
    );
}
