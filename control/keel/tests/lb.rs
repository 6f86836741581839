//! `keel lb --config FILE` as an operator runs it: the real binary, real
//! HTTP backends and client on loopback, SIGHUP reloads.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_testkit::KeelProcess;
use serde_json::{json, Value};

/// A minimal HTTP/1.1 server on a thread: answers every request with `name`
/// and closes the connection.
struct Backend {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                // Request line and headers up to the blank line.
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                    name.len()
                );
            }
        });
        Backend { port, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread exits.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(port: u16, member_port: u16) -> Value {
    json!({
        "id": "lb", "vip_address": "127.0.0.1",
        "listeners": [{"id": "http", "protocol": "HTTP", "protocol_port": port,
                       "default_pool_id": "web"}],
        "pools": [{"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                   "members": [{"id": "m", "address": "127.0.0.1", "protocol_port": member_port}]}]
    })
}

fn get(url: &str) -> String {
    ureq::get(url).call().unwrap().into_string().unwrap()
}

#[test]
fn keel_lb_serves_its_config_and_reloads_on_sighup() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    let (port, status_port) = (free_port(), free_port());
    std::fs::write(&path, config(port, a.port).to_string()).unwrap();
    let keel = KeelProcess::spawn(&[
        "lb",
        "--config",
        path.to_str().unwrap(),
        "--cores",
        "2",
        "--status-listen",
        &format!("127.0.0.1:{status_port}"),
    ])
    .unwrap();
    keel.wait_for_line("keel lb is up", Duration::from_secs(60))
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(get(&url), "a");
    // One access log line per request.
    keel.wait_for_line("\"uri\":\"/\"", Duration::from_secs(10))
        .unwrap();

    std::fs::write(&path, config(port, b.port).to_string()).unwrap();
    keel.signal(libc::SIGHUP).unwrap();
    keel.wait_for_line("reloaded", Duration::from_secs(30))
        .unwrap();
    assert_eq!(get(&url), "b");

    // A broken file is refused; the running configuration stays.
    let mut bad = config(port, b.port);
    bad["pools"][0]["members"][0]["weight"] = json!(999);
    std::fs::write(&path, bad.to_string()).unwrap();
    keel.signal(libc::SIGHUP).unwrap();
    keel.wait_for_line("reload failed", Duration::from_secs(30))
        .unwrap();
    assert!(keel.stderr().contains("weight = 999 is out of range"));
    assert_eq!(get(&url), "b");

    let status: Value = ureq::get(&format!("http://127.0.0.1:{status_port}/status"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(status["listeners"][0]["stats"]["requests"], 3);
    assert_eq!(
        status["pools"][0]["members"][0]["operating_status"],
        "NO_MONITOR"
    );

    keel.signal(libc::SIGTERM).unwrap();
    keel.wait_for_line("keel lb stopping", Duration::from_secs(30))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still open after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One API call with the admin token and optional headers.
fn api(
    keel: &KeelProcess,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = ureq::request(method, &keel.url(path))
        .timeout(Duration::from_secs(30))
        .set("authorization", &format!("Bearer {token}"));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let response = match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    (
        response.status(),
        response.into_json().unwrap_or(Value::Null),
    )
}

/// Polls the load balancer until `done` holds for it.
fn wait_lb(
    keel: &KeelProcess,
    token: &str,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, lb) = api(
            keel,
            token,
            "GET",
            &format!("/api/v1/loadbalancers/{id}"),
            &[],
            None,
        );
        assert_eq!(status, 200, "{lb}");
        if done(&lb) {
            return lb;
        }
        assert!(Instant::now() < deadline, "never {what}: {lb}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn member_status(lb: &Value, member: &str) -> String {
    lb["observed"]["pools"][0]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"] == member)
        .map(|m| m["operating_status"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

fn proxy_pids(lb: &str) -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("{lb}.json")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn load_balancer_created_through_the_api_is_served_by_the_host_agent() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let state = tempfile::tempdir().unwrap();
    let keel = KeelProcess::up(state.path()).unwrap();
    let password = std::fs::read_to_string(state.path().join("admin-password")).unwrap();
    let (status, login) = {
        let r = ureq::post(&keel.url("/api/v1/auth/login"))
            .send_json(json!({"username": "admin", "password": password.trim()}));
        match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => (r.status(), r.into_json::<Value>().unwrap()),
            Err(e) => panic!("login: {e}"),
        }
    };
    assert_eq!(status, 200, "{login}");
    let token = login["access_token"].as_str().unwrap().to_owned();
    let (status, vdc) = api(
        &keel,
        &token,
        "POST",
        "/api/v1/vdcs",
        &[],
        Some(json!({"name": "web"})),
    );
    assert_eq!(status, 201, "{vdc}");
    let port = free_port();
    let doc = |members: Value| {
        json!({
            "name": "front", "vdc_id": vdc["id"], "vip_address": "127.0.0.1",
            "listeners": [{"protocol": "HTTP", "protocol_port": port, "default_pool_id": "web"}],
            "pools": [{"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                       "healthmonitor": {"type": "HTTP", "delay": 1, "timeout": 1,
                                         "max_retries": 1, "max_retries_down": 1},
                       "members": members}]
        })
    };
    let both = json!([
        {"id": "a", "address": "127.0.0.1", "protocol_port": a.port},
        {"id": "b", "address": "127.0.0.1", "protocol_port": b.port}
    ]);

    // Bad documents are refused with the place named; nothing is stored.
    let mut bad = doc(both.clone());
    bad["pools"][0]["members"][0]["weight"] = json!(999);
    let (status, body) = api(
        &keel,
        &token,
        "POST",
        "/api/v1/loadbalancers",
        &[],
        Some(bad),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("weight = 999 is out of range"),
        "{body}"
    );
    let mut bad = doc(both.clone());
    bad["pools"][0]["lb_algorithm"] = json!("FASTEST");
    let (status, body) = api(
        &keel,
        &token,
        "POST",
        "/api/v1/loadbalancers",
        &[],
        Some(bad),
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "pools[0].lb_algorithm", "{body}");
    let mut bad = doc(both.clone());
    bad["listeners"][0]["default_tls_certificate"] =
        json!({"certificate_file": "/etc/shadow", "private_key_file": "/etc/shadow"});
    let (status, body) = api(
        &keel,
        &token,
        "POST",
        "/api/v1/loadbalancers",
        &[],
        Some(bad),
    );
    assert_eq!(status, 422, "{body}");
    let (_, list) = api(&keel, &token, "GET", "/api/v1/loadbalancers", &[], None);
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");

    // Created: the agent starts a proxy; it serves both members, and the
    // health monitor's view comes back as `observed`.
    let (status, lb) = api(
        &keel,
        &token,
        "POST",
        "/api/v1/loadbalancers",
        &[],
        Some(doc(both.clone())),
    );
    assert_eq!(status, 201, "{lb}");
    assert_eq!(lb["status"], "PENDING");
    let id = lb["id"].as_str().unwrap().to_owned();
    assert!(lb["listeners"][0]["id"].is_string(), "ids filled in: {lb}");
    wait_lb(&keel, &token, &id, "ACTIVE", |lb| lb["status"] == "ACTIVE");
    wait_lb(&keel, &token, &id, "both members ONLINE", |lb| {
        member_status(lb, "a") == "ONLINE" && member_status(lb, "b") == "ONLINE"
    });
    let url = format!("http://127.0.0.1:{port}/");
    let answers: std::collections::BTreeSet<String> = (0..4).map(|_| get(&url)).collect();
    assert_eq!(
        answers,
        ["a".to_owned(), "b".to_owned()].into(),
        "round robin over both"
    );

    // Member b dies: the monitor takes it out and only a answers.
    drop(b);
    wait_lb(&keel, &token, &id, "b in ERROR", |lb| {
        member_status(lb, "b") == "ERROR"
    });
    for _ in 0..4 {
        assert_eq!(get(&url), "a");
    }

    // Another load balancer cannot take the same VIP and port.
    let (status, body) = api(
        &keel,
        &token,
        "POST",
        "/api/v1/loadbalancers",
        &[],
        Some(doc(
            json!([{"address": "127.0.0.1", "protocol_port": a.port}]),
        )),
    );
    assert_eq!(status, 409, "{body}");

    // Replaced in place: the same proxy process applies the new document.
    let pid = proxy_pids(&id);
    assert!(!pid.is_empty(), "proxy process of {id}");
    let (_, current) = api(
        &keel,
        &token,
        "GET",
        &format!("/api/v1/loadbalancers/{id}"),
        &[],
        None,
    );
    let etag = format!("\"{}\"", current["revision"]);
    let (status, body) = api(
        &keel,
        &token,
        "PUT",
        &format!("/api/v1/loadbalancers/{id}"),
        &[("If-Match", &etag)],
        Some(doc(
            json!([{"id": "a", "address": "127.0.0.1", "protocol_port": a.port}]),
        )),
    );
    assert_eq!(status, 200, "{body}");
    let lb = wait_lb(&keel, &token, &id, "one member", |lb| {
        lb["status"] == "ACTIVE"
            && lb["observed"]["pools"][0]["members"]
                .as_array()
                .is_some_and(|m| m.len() == 1)
    });
    assert_eq!(member_status(&lb, "a"), "ONLINE", "{lb}");
    assert_eq!(proxy_pids(&id), pid, "reloaded, not restarted");
    assert_eq!(get(&url), "a");

    // Deleted: the proxy stops and the port closes.
    let etag = format!("\"{}\"", lb["revision"]);
    let (status, body) = api(
        &keel,
        &token,
        "DELETE",
        &format!("/api/v1/loadbalancers/{id}"),
        &[("If-Match", &etag)],
        None,
    );
    assert_eq!(status, 204, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || !proxy_pids(&id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "proxy still serving after delete"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // keel killed outright: its proxies end with it (none left to collide
    // with the ones the next `keel up` starts).
    let (status, lb) = api(
        &keel,
        &token,
        "POST",
        "/api/v1/loadbalancers",
        &[],
        Some(doc(both.clone())),
    );
    assert_eq!(status, 201, "{lb}");
    let id = lb["id"].as_str().unwrap().to_owned();
    wait_lb(&keel, &token, &id, "served again", |lb| {
        lb["status"] == "ACTIVE"
    });
    assert!(!proxy_pids(&id).is_empty());
    keel.signal(libc::SIGKILL).unwrap();
    let mut polls = 0;
    while !proxy_pids(&id).is_empty() {
        polls += 1;
        assert!(polls < 600, "the proxy outlived keel: {}", proxy_pids(&id));
        std::thread::sleep(Duration::from_millis(50));
    }
}
