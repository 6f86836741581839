//! Event fan-out of the management API: `subscribers` WebSocket clients on
//! `GET /events/watch` each receive every change while ports are created;
//! the peer is the same number of Server-Sent Events clients on
//! `GET /events/stream`, fed by the same creates on the same server.
//! Reported: events delivered per second (creates × subscribers / time
//! until the last subscriber has the last event).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use std::future::IntoFuture;

use super::control::{call, failed, fixture, Fixture};
use crate::{BenchError, Measurement, Scale};

/// One subscriber: connects, waits at the barrier, counts `events` changes.
type Subscriber = fn(SocketAddr, &str, i64, usize, &Barrier) -> Result<(), String>;

fn websocket(
    addr: SocketAddr,
    token: &str,
    after: i64,
    events: usize,
    ready: &Barrier,
) -> Result<(), String> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/api/v1/events/watch?after={after}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    req.headers_mut().insert("authorization", bearer);
    let (mut ws, _) = tungstenite::connect(req).map_err(|e| e.to_string())?;
    ready.wait();
    let mut seen = 0;
    while seen < events {
        if let tungstenite::Message::Text(_) = ws.read().map_err(|e| e.to_string())? {
            seen += 1;
        }
    }
    Ok(())
}

fn sse(
    addr: SocketAddr,
    token: &str,
    after: i64,
    events: usize,
    ready: &Barrier,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /api/v1/events/stream?after={after} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    ready.wait();
    let mut seen = 0;
    let mut line = String::new();
    while seen < events {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("stream ended".into());
        }
        if line.starts_with("event: change") {
            seen += 1;
        }
    }
    Ok(())
}

/// Starts `n` subscribers, runs `create` once all are connected, and
/// returns the seconds until every subscriber has every event.
fn fan_out(
    subscriber: Subscriber,
    n: usize,
    addr: SocketAddr,
    token: &str,
    after: i64,
    events: usize,
    create: impl FnOnce() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    let ready = Arc::new(Barrier::new(n + 1));
    let mut threads = Vec::with_capacity(n);
    for _ in 0..n {
        let (ready, token) = (ready.clone(), token.to_owned());
        threads.push(std::thread::spawn(move || {
            subscriber(addr, &token, after, events, &ready)
        }));
    }
    ready.wait();
    // Subscribers have sent their request; give the server a moment to
    // upgrade them all before the first change.
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    create()?;
    for t in threads {
        t.join()
            .map_err(|_| failed("subscriber", "panicked"))?
            .map_err(|e| failed("subscriber", e))?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Serves the API on loopback and measures both fan-outs on it.
pub fn measurement(scale: Scale) -> Result<Measurement, BenchError> {
    let (subscribers, events) = match scale {
        Scale::Quick => (20, 20),
        Scale::Full => (100, 200),
    };
    let scratch = tempfile::Builder::new().prefix(".keel-bench-").tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (
        Fixture {
            app,
            store,
            token,
            subnet,
        },
        addr,
    ) = runtime.block_on(async {
        let fixture = fixture(scratch.path()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(axum::serve(listener, fixture.app.clone()).into_future());
        Ok::<_, BenchError>((fixture, addr))
    })?;
    let last_seq = || -> Result<i64, BenchError> {
        runtime.block_on(async {
            let (seq,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM events")
                .fetch_one(store.pool())
                .await
                .map_err(|e| failed("events", e))?;
            Ok(seq.unwrap_or(0))
        })
    };
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let create = |n: usize| -> Result<(), BenchError> {
        runtime.block_on(async {
            for _ in 0..n {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let body = serde_json::json!({"name": format!("f{i}"), "subnet_id": subnet});
                let (status, reply) =
                    call(&app, "POST", "/api/v1/ports", Some(&token), Some(body)).await?;
                if status != 201 {
                    return Err(failed("port create", reply));
                }
            }
            Ok(())
        })
    };
    let (ws, sse) = measure(addr, &token, subscribers, events, &last_seq, &create)?;
    Ok(Measurement::new(
        &format!("event fan-out over WebSocket ({subscribers} subscribers, {events} port creates)"),
        "events/s",
        true,
        ws,
    )
    .with_peer("the same over Server-Sent Events", sse))
}

/// Both fan-outs on one served API; `create(n)` makes `n` changes.
fn measure(
    addr: SocketAddr,
    token: &str,
    subscribers: usize,
    events: usize,
    last_seq: &dyn Fn() -> Result<i64, BenchError>,
    create: &dyn Fn(usize) -> Result<(), BenchError>,
) -> Result<(f64, f64), BenchError> {
    let after = last_seq()?;
    let ws = fan_out(websocket, subscribers, addr, token, after, events, || {
        create(events)
    })?;
    let after = last_seq()?;
    let sse = fan_out(sse, subscribers, addr, token, after, events, || {
        create(events)
    })?;
    let rate = |t: f64| {
        if t > 0.0 {
            (events * subscribers) as f64 / t
        } else {
            0.0
        }
    };
    Ok((rate(ws), rate(sse)))
}
