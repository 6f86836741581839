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
