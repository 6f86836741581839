//! Test support: real HTTP backends on loopback, an HTTP client, free ports,
//! bounded waits on the proxy's status.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_lb::{LbStatus, Proxy};

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real HTTP/1.1 server answering every request with its name; `/health`
/// answers 200 too. Records request headers; stops (closing every
/// connection) on `stop()` or drop.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<HashMap<String, String>>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let std_listener = bind_retrying(addr);
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (n, h, s) = (name.to_owned(), hits.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                tokio::pin!(stop_rx);
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => return,
                        Ok((stream, _)) = listener.accept() => {
                            let (n, h, s) = (n.clone(), h.clone(), s.clone());
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                                    let (n, h, s) = (n.clone(), h.clone(), s.clone());
                                    async move {
                                        if req.uri().path() != "/health" {
                                            h.fetch_add(1, Ordering::SeqCst);
                                            let headers = req.headers().iter()
                                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                                                .collect();
                                            s.lock().unwrap().push(headers);
                                        }
                                        let body = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                                        let text = if body > 0 { format!("{n} got {body}") } else { n };
                                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(text))))
                                    }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc).await;
                            });
                        }
                    }
                }
            });
        });
        Backend {
            name: name.to_owned(),
            addr,
            hits,
            seen,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn last_headers(&self) -> HashMap<String, String> {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

/// A keep-alive HTTP client (hyper) driven by its own runtime.
pub struct Http {
    rt: tokio::runtime::Runtime,
    client: Client<HttpConnector, Empty<Bytes>>,
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Http {
    pub fn new() -> Http {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Http { rt, client }
    }

    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new()).unwrap();
        self.rt.block_on(async {
            let resp = self.client.request(req).await.unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            Reply {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            }
        })
    }
}

/// Waits (bounded) until `check` holds for the proxy's status.
pub fn wait_status(proxy: &Proxy, what: &str, check: impl Fn(&LbStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = proxy.status();
        if check(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            serde_json::to_string_pretty(&status).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request on an existing raw connection; returns the status
/// and body, or `None` if the server closed the connection.
pub fn raw_request(stream: &mut TcpStream, path: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\n\r\n");
    stream.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return Some((status, body));
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
