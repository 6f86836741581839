//! The HTTP/1.1 reverse proxy: hyper on both sides.
//!
//! Client side: keep-alive, header read timeout (`timeout_client_data`),
//! request head size bounded (larger ones get 431). Each request is routed
//! by the listener's L7 policies (first matching policy in Octavia order,
//! else the default pool), gets X-Forwarded-* headers if configured, loses
//! its hop-by-hop headers and goes to the chosen member over this core's
//! pooled upstream connections (one hyper client per core and connect
//! timeout, so a pooled connection is always driven by the core using it).
//!
//! A bodyless request whose member refuses the connection is retried once
//! on another member.
//!
//! Status codes the proxy makes itself, as HAProxy: 403 REJECT, 503 no
//! available member or member connect failure, 504 member timeout, 502
//! broken member response.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::listener::{Route, Shared};
use crate::model::L7RuleType;
use crate::plan::{PolicyAction, RulePlan};
use crate::pool::{Member, Pool};
use crate::stats::{ActiveGuard, Counters};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head accepted; larger ones get 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

type Upstream = Client<HttpConnector, Body>;

thread_local! {
    /// This core's upstream clients, one per connect timeout in use.
    static UPSTREAM: RefCell<Vec<(Duration, Upstream)>> = const { RefCell::new(Vec::new()) };
}

fn upstream(connect_timeout: Duration) -> Upstream {
    UPSTREAM.with(|clients| {
        let mut clients = clients.borrow_mut();
        if let Some((_, c)) = clients.iter().find(|(t, _)| *t == connect_timeout) {
            return c.clone();
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .set_host(false)
            .build(connector);
        clients.push((connect_timeout, client.clone()));
        client
    })
}

struct Conn {
    peer: SocketAddr,
    https: bool,
    shared: Arc<Shared>,
}

/// Serves one client connection (plain TCP or TLS) until it closes.
pub async fn serve<S>(io: S, peer: SocketAddr, https: bool, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = shared.route.load().plan.client_data_timeout;
    let conn = Arc::new(Conn {
        peer,
        https,
        shared,
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, &conn).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES);
    if let Some(t) = header_timeout {
        builder.header_read_timeout(t);
    }
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
    }
}

enum Decision<'a> {
    Reject,
    Redirect(u16, String),
    Pool(&'a Arc<Pool>),
    NoPool,
}

async fn handle(req: Request<Incoming>, conn: &Conn) -> Response<Body> {
    let started = Instant::now();
    let route = conn.shared.route.load_full();
    let listener = &conn.shared.counters;
    Counters::add(&listener.requests, 1);
    let log = route
        .access_log
        .then(|| (req.method().clone(), req.uri().clone()));
    let (response, pool, member) = match decide(&route, &req) {
        Decision::Reject => (simple(StatusCode::FORBIDDEN), None, None),
        Decision::Redirect(code, location) => (redirect(code, &location), None, None),
        Decision::NoPool => (simple(StatusCode::SERVICE_UNAVAILABLE), None, None),
        Decision::Pool(pool) => {
            let (resp, member) = forward(req, conn, &route, pool).await;
            (resp, Some(pool.id.as_str()), member)
        }
    };
    let status = response.status().as_u16();
    listener.response(status);
    if status >= 500 {
        Counters::add(&listener.request_errors, 1);
    }
    if let Some((method, uri)) = log {
        tracing::info!(target: "keel_lb::access",
            listener = %route.plan.id, client = %conn.peer, method = %method, uri = %uri,
            status, pool = pool.unwrap_or("-"), member = member.as_ref().map_or("-", |m| m.id.as_str()),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "http");
    }
    response
}

fn decide<'a>(route: &'a Route, req: &Request<Incoming>) -> Decision<'a> {
    for (policy, pool) in route.plan.policies.iter().zip(&route.policy_pools) {
        if !policy.rules.iter().all(|r| rule_matches(r, req)) {
            continue;
        }
        return match &policy.action {
            PolicyAction::Reject => Decision::Reject,
            PolicyAction::RedirectToUrl { url, code } => Decision::Redirect(*code, url.clone()),
            PolicyAction::RedirectPrefix { prefix, code } => {
                let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
                Decision::Redirect(*code, format!("{prefix}{pq}"))
            }
            PolicyAction::ToPool(_) => match pool {
                Some(p) => Decision::Pool(p),
                None => Decision::NoPool,
            },
        };
    }
    match &route.default_pool {
        Some(p) => Decision::Pool(p),
        None => Decision::NoPool,
    }
}

fn rule_matches(rule: &RulePlan, req: &Request<Incoming>) -> bool {
    let hit = match rule.kind {
        L7RuleType::HostName => host(req).is_some_and(|h| rule.matcher.matches(h)),
        L7RuleType::Path => rule.matcher.matches(req.uri().path()),
        L7RuleType::FileType => {
            let last = req.uri().path().rsplit('/').next().unwrap_or("");
            last.rsplit_once('.')
                .is_some_and(|(_, ext)| rule.matcher.matches(ext))
        }
        L7RuleType::Header => rule
            .key
            .as_deref()
            .and_then(|k| req.headers().get(k))
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| rule.matcher.matches(v)),
        L7RuleType::Cookie => rule
            .key
            .as_deref()
            .and_then(|k| cookie(req.headers(), k))
            .is_some_and(|v| rule.matcher.matches(v)),
        // Rejected by validation.
        L7RuleType::SslConnHasCert | L7RuleType::SslVerifyResult | L7RuleType::SslDnField => false,
    };
    hit != rule.invert
}

/// The Host header (or absolute-form authority) without its port.
fn host(req: &Request<Incoming>) -> Option<&str> {
    let raw = match req.headers().get(header::HOST) {
        Some(v) => v.to_str().ok()?,
        None => req.uri().host()?,
    };
    if raw.starts_with('[') {
        // [v6]:port
        return Some(raw.find(']').map_or(raw, |i| &raw[..=i]));
    }
    Some(match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    })
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection are hop-by-hop too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

async fn forward(
    req: Request<Incoming>,
    conn: &Conn,
    route: &Route,
    pool: &Arc<Pool>,
) -> (Response<Body>, Option<Arc<Member>>) {
    let Some(member) = pool.pick(conn.peer) else {
        Counters::add(&pool.counters.request_errors, 1);
        return (simple(StatusCode::SERVICE_UNAVAILABLE), None);
    };
    for c in [&pool.counters, &member.counters] {
        Counters::add(&c.requests, 1);
    }
    let _active = ActiveGuard::enter([pool.counters.clone(), member.counters.clone()]);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let insert = route.plan.insert;
    if insert.forwarded_for {
        let client = conn.peer.ip().to_string();
        let value = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {client}"),
            None => client,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            parts.headers.insert("x-forwarded-for", v);
        }
    }
    if insert.forwarded_port {
        parts.headers.insert(
            "x-forwarded-port",
            HeaderValue::from(route.plan.bind.port()),
        );
    }
    if insert.forwarded_proto {
        let proto = if conn.https { "https" } else { "http" };
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static(proto));
    }
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&member.addr.to_string()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    parts.version = hyper::Version::HTTP_11;
    // A request without a body can be sent again: keep what is needed to
    // retry it once on another member if this one refuses the connection.
    let retry = body.is_end_stream().then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let counted_in = [
        conn.shared.counters.clone(),
        pool.counters.clone(),
        member.counters.clone(),
    ];
    let body = body
        .map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                for c in &counted_in {
                    Counters::add(&c.bytes_in, data.len() as u64);
                }
            }
            frame
        })
        .boxed();
    let mut member = member;
    let mut result = exchange(route, &member, parts, body).await;
    if let (Err(Some(e)), Some((method, uri, headers))) = (&result, retry) {
        if e.is_connect() {
            if let Some(other) = pool.pick(conn.peer).filter(|m| !Arc::ptr_eq(m, &member)) {
                Counters::add(&member.counters.request_errors, 1);
                tracing::debug!(member = %member.addr, retry = %other.addr, "connect failed, retrying");
                Counters::add(&other.counters.requests, 1);
                let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
                *req.method_mut() = method;
                *req.uri_mut() = uri;
                *req.headers_mut() = headers;
                let (parts, body) = req.into_parts();
                member = other;
                result = exchange(route, &member, parts, body).await;
            }
        }
    }
    let member_id = Some(member.clone());
    let response = match result {
        Ok(resp) => resp,
        Err(err) => {
            for c in [&pool.counters, &member.counters] {
                Counters::add(&c.request_errors, 1);
            }
            let status = match &err {
                None => StatusCode::GATEWAY_TIMEOUT,
                Some(e) if e.is_connect() => StatusCode::SERVICE_UNAVAILABLE,
                Some(_) => StatusCode::BAD_GATEWAY,
            };
            tracing::debug!(member = %member.addr, error = ?err, "member request failed");
            return (simple(status), member_id);
        }
    };
    let status = response.status().as_u16();
    pool.counters.response(status);
    member.counters.response(status);
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let counted_out = [
        conn.shared.counters.clone(),
        pool.counters.clone(),
        member.counters.clone(),
    ];
    let body = body
        .map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                for c in &counted_out {
                    Counters::add(&c.bytes_out, data.len() as u64);
                }
            }
            frame
        })
        .boxed();
    (Response::from_parts(parts, body), member_id)
}

/// Sends one request to `member` over this core's pooled connections.
/// `Err(None)` is a timeout waiting for the response head.
async fn exchange(
    route: &Route,
    member: &Member,
    mut parts: hyper::http::request::Parts,
    body: Body,
) -> Result<Response<Incoming>, Option<hyper_util::client::legacy::Error>> {
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
    uri.authority = member.authority.clone();
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
    }
    // Only fails without an authority, which a member always has.
    if let Ok(u) = Uri::from_parts(uri) {
        parts.uri = u;
    }
    let request =
        upstream(route.plan.member_connect_timeout).request(Request::from_parts(parts, body));
    match route.plan.member_data_timeout {
        Some(t) => match tokio::time::timeout(t, request).await {
            Ok(r) => r.map_err(Some),
            Err(_) => Err(None),
        },
        None => request.await.map_err(Some),
    }
}

fn simple(status: StatusCode) -> Response<Body> {
    let text = status.canonical_reason().unwrap_or("");
    let mut resp = Response::new(full(format!("{} {text}\n", status.as_u16())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn redirect(code: u16, location: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::FOUND);
    let mut resp = simple(status);
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}
