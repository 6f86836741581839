//! keel-lb end to end on loopback: real HTTP backends, real clients (hyper,
//! curl, raw sockets), the real proxy threads.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::{free_port, raw_request, wait_status, Backend, Http};
use keel_lb::stats::OperatingStatus;
use keel_lb::{LoadBalancer, Proxy, ProxyOptions};
use serde_json::json;

fn proxy() -> Proxy {
    Proxy::start(ProxyOptions {
        cores: 2,
        pin_cores: false,
    })
    .unwrap()
}

fn members(backends: &[&Backend]) -> serde_json::Value {
    backends
        .iter()
        .map(|b| json!({"id": b.name, "address": "127.0.0.1", "protocol_port": b.addr.port()}))
        .collect()
}

fn config(v: serde_json::Value) -> LoadBalancer {
    serde_json::from_value(v).unwrap()
}

fn http_lb(port: u16, pool: serde_json::Value) -> LoadBalancer {
    config(json!({
        "id": "lb", "vip_address": "127.0.0.1",
        "listeners": [{"id": "http", "protocol": "HTTP", "protocol_port": port,
                       "default_pool_id": pool["id"]}],
        "pools": [pool]
    }))
}

#[test]
fn round_robin_spreads_requests_evenly_over_members() {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let port = free_port();
    let p = proxy();
    let pool = json!({"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                      "members": members(&backends.iter().collect::<Vec<_>>())});
    p.apply(&http_lb(port, pool)).unwrap();
    let client = Http::new();
    for _ in 0..300 {
        let r = client.get(&format!("http://127.0.0.1:{port}/x"), &[]);
        assert_eq!(r.status, 200);
    }
    for b in &backends {
        assert_eq!(b.hits(), 100, "backend {}", b.name);
    }
    let status = p.status();
    let l = status.listener("http").unwrap();
    assert_eq!(l.stats.requests, 300);
    assert_eq!(l.stats.responses_2xx, 300);
    assert!(l.stats.bytes_out >= 300);
    let pool = status.pool("web").unwrap();
    assert_eq!(pool.member("b").unwrap().stats.requests, 100);
    assert_eq!(pool.operating_status, OperatingStatus::NoMonitor);
}

#[test]
fn a_dead_member_is_taken_out_by_its_monitor_and_comes_back() {
    let a = Backend::start("a");
    let mut b = Backend::start("b");
    let b_addr = b.addr;
    let port = free_port();
    let p = proxy();
    let pool = json!({"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
        "healthmonitor": {"type": "HTTP", "delay": 1, "timeout": 1, "max_retries": 2,
                          "max_retries_down": 1, "url_path": "/health", "expected_codes": "200"},
        "members": members(&[&a, &b])});
    p.apply(&http_lb(port, pool)).unwrap();
    let member_is = |id: &'static str, s: OperatingStatus| {
        move |st: &keel_lb::LbStatus| {
            st.pool("web")
                .and_then(|p| p.member(id))
                .map(|m| m.operating_status)
                == Some(s)
        }
    };
    wait_status(&p, "b ONLINE", member_is("b", OperatingStatus::Online));

    b.stop();
    wait_status(&p, "b ERROR", member_is("b", OperatingStatus::Error));
    assert_eq!(
        p.status().pool("web").unwrap().operating_status,
        OperatingStatus::Degraded
    );
    let client = Http::new();
    let a_before = a.hits();
    for _ in 0..40 {
        let r = client.get(&format!("http://127.0.0.1:{port}/"), &[]);
        assert_eq!((r.status, r.body.as_str()), (200, "a"));
    }
    assert_eq!(a.hits() - a_before, 40);
    let errors = p.status().pool("web").unwrap().stats.request_errors;
    assert_eq!(errors, 0);

    let b = Backend::start_on("b", b_addr);
    wait_status(&p, "b back ONLINE", member_is("b", OperatingStatus::Online));
    for _ in 0..40 {
        assert_eq!(
            client.get(&format!("http://127.0.0.1:{port}/"), &[]).status,
            200
        );
    }
    assert_eq!(b.hits(), 20);
}

#[test]
fn forwarded_headers_reach_the_member() {
    let a = Backend::start("a");
    let port = free_port();
    let p = proxy();
    let mut lb = json!({
        "id": "lb", "vip_address": "127.0.0.1",
        "listeners": [{"id": "http", "protocol": "HTTP", "protocol_port": port,
                       "default_pool_id": "web",
                       "insert_headers": {"X-Forwarded-For": "true", "X-Forwarded-Port": "true",
                                          "X-Forwarded-Proto": "true"}}],
        "pools": [{"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                   "members": members(&[&a])}]
    });
    p.apply(&config(lb.clone())).unwrap();
    // curl as the client; one hop already recorded in X-Forwarded-For.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "Connection: keep-alive, X-Secret",
        ])
        .args(["-H", "X-Secret: hop-only"])
        .arg(format!("http://127.0.0.1:{port}/who"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a");
    let h = a.last_headers();
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-port"], port.to_string());
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(
        !h.contains_key("x-secret"),
        "hop-by-hop header forwarded: {h:?}"
    );

    // Turning the insertion off (a reload) stops it.
    lb["listeners"][0]["insert_headers"] = json!({});
    p.apply(&config(lb)).unwrap();
    assert_eq!(
        Http::new()
            .get(&format!("http://127.0.0.1:{port}/"), &[])
            .status,
        200
    );
    assert!(!a.last_headers().contains_key("x-forwarded-for"));
}

#[test]
fn l7_policies_route_reject_and_redirect() {
    let web = Backend::start("web");
    let api = Backend::start("api");
    let port = free_port();
    let p = proxy();
    p.apply(&config(json!({
        "id": "lb", "vip_address": "127.0.0.1",
        "listeners": [{"id": "http", "protocol": "HTTP", "protocol_port": port,
            "default_pool_id": "web",
            "l7policies": [
                {"id": "api", "position": 1, "action": "REDIRECT_TO_POOL", "redirect_pool_id": "api",
                 "rules": [{"type": "PATH", "compare_type": "STARTS_WITH", "value": "/api/"}]},
                {"id": "beta-api", "position": 2, "action": "REDIRECT_TO_POOL", "redirect_pool_id": "api",
                 "rules": [{"type": "HOST_NAME", "compare_type": "EQUAL_TO", "value": "beta.test"},
                           {"type": "COOKIE", "key": "tier", "compare_type": "REGEX", "value": "^gold$"}]},
                {"id": "no-admin", "position": 3, "action": "REJECT",
                 "rules": [{"type": "PATH", "compare_type": "STARTS_WITH", "value": "/admin"}]},
                {"id": "images", "position": 4, "action": "REDIRECT_PREFIX",
                 "redirect_prefix": "https://cdn.test", "redirect_http_code": 301,
                 "rules": [{"type": "FILE_TYPE", "compare_type": "EQUAL_TO", "value": "png"},
                           {"type": "HEADER", "key": "X-No-Cdn", "compare_type": "EQUAL_TO",
                            "value": "1", "invert": true}]}
            ]}],
        "pools": [
            {"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN", "members": members(&[&web])},
            {"id": "api", "protocol": "HTTP", "lb_algorithm": "LEAST_CONNECTIONS", "members": members(&[&api])}
        ]
    })))
    .unwrap();
    let c = Http::new();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    assert_eq!(c.get(&url("/api/v1"), &[]).body, "api");
    assert_eq!(c.get(&url("/apiary"), &[]).body, "web");
    assert_eq!(c.get(&url("/"), &[]).body, "web");
    // Both rules must hold (AND).
    assert_eq!(
        c.get(
            &url("/"),
            &[("host", "beta.test:8080"), ("cookie", "a=1; tier=gold")]
        )
        .body,
        "api"
    );
    assert_eq!(
        c.get(
            &url("/"),
            &[("host", "beta.test"), ("cookie", "tier=silver")]
        )
        .body,
        "web"
    );
    assert_eq!(c.get(&url("/admin/users"), &[]).status, 403);
    let r = c.get(&url("/img/logo.png?v=2"), &[]);
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://cdn.test/img/logo.png?v=2");
    // Inverted rule: the header opts out of the redirect.
    assert_eq!(
        c.get(&url("/img/logo.png"), &[("x-no-cdn", "1")]).body,
        "web"
    );
    assert_eq!(web.hits(), 4);
    assert_eq!(api.hits(), 2);
}

fn write_cert(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keel test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();
    (ca_path, cert_path, key_path)
}

#[test]
fn terminated_https_serves_a_verified_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = write_cert(dir.path(), "lb.test");
    let a = Backend::start("a");
    let port = free_port();
    let p = proxy();
    let mut lb = json!({
        "id": "lb", "vip_address": "127.0.0.1",
        "listeners": [{"id": "https", "protocol": "TERMINATED_HTTPS", "protocol_port": port,
            "default_pool_id": "web",
            "insert_headers": {"X-Forwarded-Proto": "true"},
            "default_tls_certificate": {"certificate_file": cert, "private_key_file": key}}],
        "pools": [{"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                   "members": members(&[&a])}]
    });
    p.apply(&config(lb.clone())).unwrap();
    // curl verifies the chain against the test CA and the name lb.test.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("lb.test:{port}:127.0.0.1")])
        .arg(format!("https://lb.test:{port}/secure"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a");
    assert_eq!(a.last_headers()["x-forwarded-proto"], "https");
    // A name the certificate does not cover fails verification.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("other.test:{port}:127.0.0.1")])
        .arg(format!("https://other.test:{port}/"))
        .output()
        .unwrap();
    assert!(!out.status.success());

    // A key that does not belong to the certificate is a config-time error,
    // and the running listener keeps serving.
    let other_dir = tempfile::tempdir().unwrap();
    let (_, _, wrong_key) = write_cert(other_dir.path(), "lb.test");
    lb["listeners"][0]["default_tls_certificate"]["private_key_file"] = json!(wrong_key);
    let err = p.apply(&config(lb)).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("does not match the certificate"), "{chain}");
}

#[test]
fn connection_limit_is_enforced() {
    let a = Backend::start("a");
    let port = free_port();
    let p = proxy();
    let mut lb = http_lb(
        port,
        json!({"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                                      "members": members(&[&a])}),
    );
    lb.listeners[0].connection_limit = 2;
    p.apply(&lb).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut first = TcpStream::connect(&addr).unwrap();
    let mut second = TcpStream::connect(&addr).unwrap();
    assert_eq!(raw_request(&mut first, "/").unwrap().0, 200);
    assert_eq!(raw_request(&mut second, "/").unwrap().0, 200);
    let mut third = TcpStream::connect(&addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(
        raw_request(&mut third, "/"),
        None,
        "third connection was served"
    );
    assert_eq!(
        p.status()
            .listener("http")
            .unwrap()
            .stats
            .rejected_connections,
        1
    );
    // Established connections keep working; closing one frees a slot.
    assert_eq!(raw_request(&mut first, "/").unwrap().0, 200);
    drop(second);
    wait_status(&p, "a free slot", |s| {
        s.listener("http").unwrap().stats.active_connections < 2
    });
    let mut fourth = TcpStream::connect(&addr).unwrap();
    assert_eq!(raw_request(&mut fourth, "/").unwrap().0, 200);
}

#[test]
fn apply_reroutes_without_dropping_established_connections() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let port = free_port();
    let p = proxy();
    let pool = |b: &Backend| {
        json!({"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                                    "members": members(&[b])})
    };
    p.apply(&http_lb(port, pool(&old))).unwrap();
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(raw_request(&mut conn, "/").unwrap(), (200, "old".into()));
    let report = p.apply(&http_lb(port, pool(&new))).unwrap();
    assert_eq!(report.listeners_updated, vec!["http".to_string()]);
    assert!(report.listeners_started.is_empty());
    // Same TCP connection, new member.
    assert_eq!(raw_request(&mut conn, "/").unwrap(), (200, "new".into()));
    // An invalid desired state changes nothing.
    let mut bad = http_lb(port, pool(&new));
    bad.listeners[0].default_pool_id = Some("missing".into());
    assert!(p.apply(&bad).is_err());
    assert_eq!(raw_request(&mut conn, "/").unwrap(), (200, "new".into()));
    // Removing the listener stops accepting but the connection lives on.
    let mut empty = http_lb(port, pool(&new));
    empty.listeners.clear();
    let report = p.apply(&empty).unwrap();
    assert_eq!(report.listeners_stopped.len(), 1);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    assert_eq!(raw_request(&mut conn, "/").unwrap().0, 200);
}

#[test]
fn tcp_listener_with_source_ip_keeps_a_client_on_one_member() {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let port = free_port();
    let p = proxy();
    p.apply(&config(json!({
        "id": "lb", "vip_address": "127.0.0.1",
        "listeners": [{"id": "tcp", "protocol": "TCP", "protocol_port": port, "default_pool_id": "p"}],
        "pools": [{"id": "p", "protocol": "TCP", "lb_algorithm": "SOURCE_IP",
                   "members": members(&backends.iter().collect::<Vec<_>>())}]
    })))
    .unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        // A new TCP connection each time, the HTTP bytes pass through untouched.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (status, body) = raw_request(&mut s, "/").unwrap();
        assert_eq!(status, 200);
        seen.insert(body);
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    // A bulk upload through the TCP listener (spliced in the kernel) arrives
    // complete.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = vec![b'z'; 4 << 20];
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
    std::io::Write::write_all(&mut s, &body).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.ends_with(&format!("got {}", body.len())), "{answer}");
    drop(s);
    let status = p.status();
    assert_eq!(status.listener("tcp").unwrap().stats.total_connections, 21);
    wait_status(&p, "the upload counted", |s| {
        s.pool("p").unwrap().stats.bytes_in > 4 << 20
    });
}

/// Sends raw bytes on a new connection and returns the status line of the
/// answer (empty if the proxy closed without one).
fn raw_exchange(port: u16, bytes: &[u8]) -> String {
    raw_exchange_all(port, bytes)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Like [`raw_exchange`], the whole answer.
fn raw_exchange_all(port: u16, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_requests_are_refused_before_any_member_sees_them() {
    let a = Backend::start("a");
    let port = free_port();
    let p = proxy();
    let mut lb = http_lb(
        port,
        json!({"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                                      "members": members(&[&a])}),
    );
    lb.listeners[0].l7policies = serde_json::from_value(json!([{"id": "no-admin", "position": 1,
        "action": "REJECT",
        "rules": [{"type": "PATH", "compare_type": "STARTS_WITH", "value": "/admin"}]}]))
    .unwrap();
    p.apply(&lb).unwrap();
    // Request smuggling: Content-Length and Transfer-Encoding together. As
    // HAProxy does (RFC 9112 §6.3), the proxy frames by Transfer-Encoding,
    // drops the Content-Length, re-frames towards the member and closes the
    // client connection after the answer: the hidden request is never run.
    let smuggle = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange_all(port, smuggle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert_eq!(a.hits(), 1);
    let seen = a.last_headers();
    assert!(
        !(seen.contains_key("content-length") && seen.contains_key("transfer-encoding")),
        "{seen:?}"
    );
    // Two different Content-Length values.
    let double = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
    assert!(raw_exchange(port, double).starts_with("HTTP/1.1 400"));
    // A request head beyond the 64 KiB limit.
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let answer = raw_exchange(port, &big);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // Garbage instead of a request line.
    assert!(raw_exchange(port, b"\x16\x03\x01 not http\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert_eq!(a.hits(), 1);
    // The proxy still serves well-formed requests.
    assert_eq!(
        Http::new()
            .get(&format!("http://127.0.0.1:{port}/"), &[])
            .body,
        "a"
    );
}

#[test]
fn a_refused_connect_is_retried_on_another_member() {
    let live = Backend::start("live");
    // A member whose port nobody listens on, and no monitor to notice.
    let dead_port = free_port();
    let port = free_port();
    let p = proxy();
    p.apply(&http_lb(
        port,
        json!({"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
        "members": [{"id": "dead", "address": "127.0.0.1", "protocol_port": dead_port},
                    {"id": "live", "address": "127.0.0.1", "protocol_port": live.addr.port()}]}),
    ))
    .unwrap();
    let c = Http::new();
    for _ in 0..10 {
        let r = c.get(&format!("http://127.0.0.1:{port}/"), &[]);
        assert_eq!((r.status, r.body.as_str()), (200, "live"));
    }
    assert_eq!(live.hits(), 10);
    let status = p.status();
    let dead = status.pool("web").unwrap().member("dead").unwrap();
    // Round robin hands every first attempt to "dead" (the retry takes the
    // next slot), and every retry lands on "live".
    assert_eq!(dead.stats.request_errors, 10);
    assert_eq!(status.listener("http").unwrap().stats.responses_2xx, 10);
}
