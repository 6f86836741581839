//! `lb`: requests/s through keel-lb against HAProxy (Debian's, started here
//! with an equivalent configuration), same backend, same client, same run.
//!
//! Layout on a 2-CPU machine (the set-up): the proxy under test gets
//! CPU 0 (keel-lb: one core thread pinned there; HAProxy: `nbthread 1`
//! under `taskset -c 0`), the load generator `wrk` and the HTTP backend
//! (hyper, one pinned thread in this process) share CPU 1. Rounds alternate
//! keel-lb and HAProxy so machine noise hits both alike.
//!
//! Scenarios: HTTP/1.1 keep-alive (throughput and p99), close mode (a new
//! TCP connection per request), a TCP listener relaying keep-alive HTTP
//! (L4, spliced in keel-lb), and new TLS connections per second
//! (TERMINATED_HTTPS, `Connection: close`). CPU per request is the proxy's
//! own CPU time (its thread or process, from /proc) divided by requests.
//!
//! Skips, with a message, when `haproxy` or `wrk` is not installed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use keel_lb::cores::Core;
use keel_lb::{LoadBalancer, Proxy, ProxyOptions};

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "lb",
    about: "L7 proxy: HTTP req/s, p99 and TLS handshakes/s through keel-lb vs HAProxy (wrk)",
    run,
};

const PEER: &str = "HAProxy (Debian), nbthread 1";
const CONNECTIONS: u32 = 64;

fn err(msg: impl Into<String>) -> BenchError {
    BenchError::Io(std::io::Error::other(msg.into()))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    for tool in ["haproxy", "wrk"] {
        if !have(tool) {
            eprintln!("bench lb: skipped: `{tool}` is not installed (apt-get install {tool})");
            return Ok(Vec::new());
        }
    }
    let (rounds, seconds) = match scale {
        Scale::Quick => (1, 1),
        Scale::Full => (3, 5),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cpus >= 2;
    let dir = tempfile::tempdir()?;
    let (cert, key, combined) = write_certificate(dir.path())?;

    let backend = Backend::start(pin)?;
    let ports = Ports::pick()?;
    let proxy = Proxy::start(ProxyOptions {
        cores: 1,
        pin_cores: pin,
    })
    .map_err(|e| err(format!("keel-lb: {e}")))?;
    proxy
        .apply(&keel_config(&ports, backend.addr, &cert, &key)?)
        .map_err(|e| err(format!("keel-lb apply: {e}")))?;
    let haproxy = HaProxy::start(dir.path(), &ports, backend.addr, &combined, pin)?;
    let keel_cpu = || thread_cpu_seconds("keel-lb-0");
    let haproxy_cpu = || process_cpu_seconds(haproxy.child.id());

    let scenarios: [(&str, &str, u16, u16, &[&str]); 4] = [
        (
            "HTTP/1.1 keep-alive",
            "http",
            ports.keel_http,
            ports.haproxy_http,
            &[],
        ),
        (
            "HTTP/1.1 close mode",
            "http",
            ports.keel_http,
            ports.haproxy_http,
            &["-H", "Connection: close"],
        ),
        (
            "TCP listener (L4 relay), keep-alive HTTP inside",
            "http",
            ports.keel_tcp,
            ports.haproxy_tcp,
            &[],
        ),
        (
            "TLS new connections",
            "https",
            ports.keel_https,
            ports.haproxy_https,
            &["-H", "Connection: close"],
        ),
    ];
    let mut out = Vec::new();
    for (name, scheme, keel_port, haproxy_port, extra) in scenarios {
        let (mut k, mut h) = (Totals::default(), Totals::default());
        for _ in 0..rounds {
            k.add(measure(scheme, keel_port, extra, seconds, pin, &keel_cpu)?);
            h.add(measure(
                scheme,
                haproxy_port,
                extra,
                seconds,
                pin,
                &haproxy_cpu,
            )?);
        }
        let unit = if scheme == "https" { "conn/s" } else { "req/s" };
        out.push(
            Measurement::new(&format!("{name}: throughput"), unit, true, k.rate())
                .with_peer(PEER, h.rate()),
        );
        out.push(
            Measurement::new(&format!("{name}: p99 latency"), "ms", false, k.p99())
                .with_peer(PEER, h.p99()),
        );
        out.push(
            Measurement::new(
                &format!("{name}: proxy CPU per request"),
                "µs",
                false,
                k.cpu_us(),
            )
            .with_peer(PEER, h.cpu_us()),
        );
        if k.errors > 0 || h.errors > 0 {
            eprintln!(
                "bench lb: {name}: wrk reported errors (keel-lb {}, HAProxy {})",
                k.errors, h.errors
            );
        }
    }
    drop(haproxy);
    drop(proxy);
    drop(backend);
    Ok(out)
}

#[derive(Default)]
struct Totals {
    requests: f64,
    seconds: f64,
    cpu: f64,
    /// p99 of each round; the worst round is reported.
    p99s: Vec<f64>,
    errors: u64,
}

impl Totals {
    fn add(&mut self, r: WrkRun) {
        self.requests += r.requests;
        self.seconds += r.seconds;
        self.cpu += r.cpu_seconds;
        self.p99s.push(r.p99_ms);
        self.errors += r.errors;
    }
    fn rate(&self) -> f64 {
        self.requests / self.seconds.max(1e-9)
    }
    fn p99(&self) -> f64 {
        self.p99s.iter().copied().fold(0.0, f64::max)
    }
    fn cpu_us(&self) -> f64 {
        self.cpu * 1e6 / self.requests.max(1.0)
    }
}

struct WrkRun {
    requests: f64,
    seconds: f64,
    p99_ms: f64,
    cpu_seconds: f64,
    errors: u64,
}

fn measure(
    scheme: &str,
    port: u16,
    extra: &[&str],
    seconds: u32,
    pin: bool,
    cpu: &dyn Fn() -> Result<f64, BenchError>,
) -> Result<WrkRun, BenchError> {
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", "wrk"]);
        c
    } else {
        Command::new("wrk")
    };
    cmd.args([
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{seconds}s"),
        "--latency",
    ])
    .args(extra)
    .arg(format!("{scheme}://127.0.0.1:{port}/"));
    let cpu_before = cpu()?;
    let started = Instant::now();
    let output = cmd.output()?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu()? - cpu_before;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(err(format!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    parse_wrk(&text, cpu_seconds)
        .ok_or_else(|| err(format!("cannot parse wrk output ({elapsed:.1} s):\n{text}")))
}

/// Reads "N requests in Xs", the 99 % latency line and error counts.
fn parse_wrk(text: &str, cpu_seconds: f64) -> Option<WrkRun> {
    let mut requests = None;
    let mut seconds = None;
    let mut p99 = None;
    let mut errors = 0u64;
    for line in text.lines().map(str::trim) {
        if let Some((n, rest)) = line.split_once(" requests in ") {
            requests = n.trim().parse::<f64>().ok();
            seconds = rest
                .split(',')
                .next()
                .and_then(duration_ms)
                .map(|ms| ms / 1000.0);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = duration_ms(v.trim());
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some(WrkRun {
        requests: requests?,
        seconds: seconds?,
        p99_ms: p99?,
        cpu_seconds,
        errors,
    })
}

/// wrk durations: "812.00us", "1.23ms", "2.00s", "1.00m".
fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, factor) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * factor)
}

struct Ports {
    keel_http: u16,
    keel_https: u16,
    keel_tcp: u16,
    haproxy_http: u16,
    haproxy_https: u16,
    haproxy_tcp: u16,
}

impl Ports {
    fn pick() -> Result<Ports, BenchError> {
        // Hold all of them until chosen so they differ.
        let l: Vec<std::net::TcpListener> = (0..6)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let p = |i: usize| l[i].local_addr().map(|a| a.port());
        Ok(Ports {
            keel_http: p(0)?,
            keel_https: p(1)?,
            haproxy_http: p(2)?,
            haproxy_https: p(3)?,
            keel_tcp: p(4)?,
            haproxy_tcp: p(5)?,
        })
    }
}

fn keel_config(
    ports: &Ports,
    backend: SocketAddr,
    cert: &Path,
    key: &Path,
) -> Result<LoadBalancer, BenchError> {
    let members =
        serde_json::json!([{"id": "m1", "address": backend.ip(), "protocol_port": backend.port()}]);
    let pool = serde_json::json!({"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
        "members": members});
    let tcp_pool = serde_json::json!({"id": "tcp", "protocol": "TCP", "lb_algorithm": "ROUND_ROBIN",
        "members": members});
    serde_json::from_value(serde_json::json!({
        "id": "bench", "vip_address": "127.0.0.1", "access_log": false,
        "listeners": [
            {"id": "http", "protocol": "HTTP", "protocol_port": ports.keel_http,
             "default_pool_id": "web"},
            {"id": "https", "protocol": "TERMINATED_HTTPS", "protocol_port": ports.keel_https,
             "default_pool_id": "web",
             "default_tls_certificate": {"certificate_file": cert, "private_key_file": key}},
            {"id": "tcp", "protocol": "TCP", "protocol_port": ports.keel_tcp, "default_pool_id": "tcp"}
        ],
        "pools": [pool, tcp_pool]
    }))
    .map_err(|e| err(format!("bench config: {e}")))
}

struct HaProxy {
    child: Child,
}

impl HaProxy {
    fn start(
        dir: &Path,
        ports: &Ports,
        backend: SocketAddr,
        pem: &Path,
        pin: bool,
    ) -> Result<HaProxy, BenchError> {
        // What Octavia renders for an HTTP listener with a ROUND_ROBIN pool
        // and no health monitor, logging off (keel-lb runs with access_log
        // off too), one thread.
        let config = format!(
            "global\n  nbthread 1\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 50s\n  timeout server 50s\n\
             frontend http\n  bind 127.0.0.1:{}\n  default_backend web\n\
             frontend https\n  bind 127.0.0.1:{} ssl crt {} alpn http/1.1\n  default_backend web\n\
             backend web\n  balance roundrobin\n  server m1 {}\n\
             frontend tcp\n  mode tcp\n  bind 127.0.0.1:{}\n  default_backend tcp\n\
             backend tcp\n  mode tcp\n  balance roundrobin\n  server m1 {}\n",
            ports.haproxy_http,
            ports.haproxy_https,
            pem.display(),
            backend,
            ports.haproxy_tcp,
            backend
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let mut cmd = if pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", "haproxy"]);
            c
        } else {
            Command::new("haproxy")
        };
        let log = dir.join("haproxy.log");
        let child = cmd
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut haproxy = HaProxy { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", ports.haproxy_https)).is_err() {
            let exited = haproxy.child.try_wait()?.is_some();
            if exited || Instant::now() > deadline {
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(err(format!(
                    "haproxy did not start listening (exited: {exited}):\n{output}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(haproxy)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The backend: a hyper HTTP/1.1 server answering "ok" on one core thread.
struct Backend {
    addr: SocketAddr,
    _core: Core,
}

impl Backend {
    fn start(pin: bool) -> Result<Backend, BenchError> {
        let core = Core::start("bench-backend".into(), pin.then_some(1))
            .map_err(|e| err(format!("backend thread: {e}")))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        core.handle.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Backend { addr, _core: core })
    }
}

/// A self-signed ECDSA P-256 certificate for 127.0.0.1: separate PEM files
/// for keel-lb, one combined file for HAProxy.
fn write_certificate(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), BenchError> {
    let key = rcgen::KeyPair::generate().map_err(|e| err(format!("rcgen: {e}")))?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| err(format!("rcgen: {e}")))?;
    let (c, k, both) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("both.pem"),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    let mut f = std::fs::File::create(&both)?;
    f.write_all(cert.pem().as_bytes())?;
    f.write_all(key.serialize_pem().as_bytes())?;
    Ok((c, k, both))
}

/// CPU seconds (user + system) of this process's thread named `name`.
fn thread_cpu_seconds(name: &str) -> Result<f64, BenchError> {
    for entry in std::fs::read_dir("/proc/self/task")? {
        let dir = entry?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return stat_cpu_seconds(&dir.join("stat"));
        }
    }
    Err(err(format!("no thread named {name}")))
}

fn process_cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    stat_cpu_seconds(Path::new(&format!("/proc/{pid}/stat")))
}

/// utime + stime from a /proc stat file (fields 14 and 15), in seconds.
fn stat_cpu_seconds(path: &Path) -> Result<f64, BenchError> {
    let text = std::fs::read_to_string(path)?;
    // The command name (field 2) may contain spaces; fields after ')' are plain.
    let after = text.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // After ')', field 3 (state) is index 0, so utime (14) is index 11.
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => {
            // SAFETY: sysconf only reads a configuration value.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            Ok((u + s) / if hz > 0 { hz as f64 } else { 100.0 })
        }
        _ => Err(err(format!("cannot parse {}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let text = "Running 1s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n\
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.10ms  200.00us   5.00ms   90.00%\n\
            Latency Distribution\n     50%    1.00ms\n     75%    1.20ms\n     90%    1.40ms\n     99%  812.00us\n\
            12345 requests in 1.00s, 1.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
            Requests/sec:  12345.00\n";
        let r = parse_wrk(text, 0.5).unwrap();
        assert_eq!(r.requests, 12345.0);
        assert_eq!(r.seconds, 1.0);
        assert!((r.p99_ms - 0.812).abs() < 1e-9);
        assert_eq!(r.errors, 3);
    }

    #[test]
    fn quick_run_compares_with_haproxy_or_skips() {
        let ms = run(Scale::Quick).unwrap();
        if !(have("haproxy") && have("wrk")) {
            assert!(ms.is_empty());
            return;
        }
        assert_eq!(ms.len(), 12);
        for m in &ms {
            assert!(m.value > 0.0 && m.ratio.is_some_and(|r| r > 0.0), "{m:?}");
        }
    }
}
