//! `control`: the management API's create and list paths, in process
//! (the real router: authentication, idempotency and audit middleware, one
//! transaction per create with its event row), against the bare durable
//! store write each create has to pay anyway (`Store::put_meta`, one
//! fsynced transaction) as the peer. Lists are compared with the same page
//! read by one raw SQL query. Then the same creates (throughput and p99
//! latency) and lists on a PostgreSQL server (fsync on, loopback, started
//! from Debian's `postgresql` when installed) against embedded SQLite.

use std::path::PathBuf;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use keel_control::api::{self, auth, AppState};
use keel_control::store::{Store, DB_FILE};
use tower::ServiceExt;

use crate::{BenchError, Measurement, Scale, Suite};

pub const SUITE: Suite = Suite {
    name: "control",
    about: "API port creates/lists vs. bare durable store writes/raw SQL reads",
    run,
};

pub(super) const PASSWORD: &str = "Bench-secret-pw-1";

pub(super) fn failed(what: &str, detail: impl std::fmt::Display) -> BenchError {
    BenchError::Io(std::io::Error::other(format!("{what}: {detail}")))
}

pub(super) async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), BenchError> {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let req = req.body(body).map_err(|e| failed("request", e))?;
    let response = app
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| failed("call", e))?;
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .map_err(|e| failed("body", e))?;
    let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

pub(super) fn id_of(v: &serde_json::Value) -> Result<String, BenchError> {
    v["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| failed("no id in", v))
}

/// The API on a fresh store, logged in, with one subnet to put ports in.
pub(super) struct Fixture {
    pub app: axum::Router,
    pub store: Store,
    pub token: String,
    pub subnet: String,
}

pub(super) async fn fixture(dir: &std::path::Path) -> Result<Fixture, BenchError> {
    fixture_on(Store::open(&dir.join(DB_FILE)).await?, dir).await
}

/// As [`fixture`], on an open store (PostgreSQL for the backend comparison).
async fn fixture_on(store: Store, dir: &std::path::Path) -> Result<Fixture, BenchError> {
    auth::bootstrap_admin(&store, Some(PASSWORD.into()))
        .await
        .map_err(|e| failed("bootstrap", e))?;
    let version = api::version::Version {
        version: "bench".into(),
        api_version: "v1".into(),
        schema_version: store.schema_version().await?,
        instance_id: store.instance_id().await?,
    };
    let app = api::app(AppState::new(store.clone(), version, dir.to_owned()));
    let login = serde_json::json!({"username": "admin", "password": PASSWORD});
    let (_, tokens) = call(&app, "POST", "/api/v1/auth/login", None, Some(login)).await?;
    let token = tokens["access_token"]
        .as_str()
        .ok_or_else(|| failed("login", &tokens))?
        .to_owned();
    let t = Some(token.as_str());
    let (_, vdc) = call(
        &app,
        "POST",
        "/api/v1/vdcs",
        t,
        Some(serde_json::json!({"name": "bench"})),
    )
    .await?;
    let (_, vpc) = call(
        &app,
        "POST",
        "/api/v1/vpcs",
        t,
        Some(serde_json::json!({"name": "bench", "vdc_id": id_of(&vdc)?})),
    )
    .await?;
    let body = serde_json::json!({"name": "bench", "vpc_id": id_of(&vpc)?, "cidr": "10.0.0.0/16"});
    let (_, subnet) = call(&app, "POST", "/api/v1/subnets", t, Some(body)).await?;
    let subnet = id_of(&subnet)?;
    Ok(Fixture {
        app,
        store,
        token,
        subnet,
    })
}

fn run(scale: Scale) -> Result<Vec<Measurement>, BenchError> {
    let creates = match scale {
        Scale::Quick => 100,
        Scale::Full => 2000,
    };
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from);
    let scratch = tempfile::Builder::new()
        .prefix(".keel-bench-")
        .tempdir_in(base)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(async {
            let Fixture {
                app,
                store,
                token,
                subnet,
            } = fixture(scratch.path()).await?;
            let t = Some(token.as_str());

            // Alternate rounds of 10 so noise hits both alike.
            let (mut api_time, mut peer_time) = (0.0, 0.0);
            for round in 0..creates / 10 {
                let start = Instant::now();
                for i in round * 10..round * 10 + 10 {
                    let body = serde_json::json!({"name": format!("p{i}"), "subnet_id": subnet});
                    let (status, reply) =
                        call(&app, "POST", "/api/v1/ports", t, Some(body)).await?;
                    if status != 201 {
                        return Err(failed("port create", reply));
                    }
                }
                api_time += start.elapsed().as_secs_f64();
                let start = Instant::now();
                for i in round * 10..round * 10 + 10 {
                    store
                        .put_meta(&format!("bench/{i}"), &"x".repeat(200))
                        .await?;
                }
                peer_time += start.elapsed().as_secs_f64();
            }
            let create = Measurement::new(
                &format!("port creates via the API (subnet of {creates} ports)"),
                "creates/s",
                true,
                per_sec(creates, api_time),
            )
            .with_peer("bare durable store write", per_sec(creates, peer_time));

            let pages = 50;
            let (mut api_time, mut peer_time) = (0.0, 0.0);
            for _ in 0..pages {
                let start = Instant::now();
                let (status, page) =
                    call(&app, "GET", "/api/v1/ports?limit=100&sort=name", t, None).await?;
                if status != 200 {
                    return Err(failed("list", page));
                }
                api_time += start.elapsed().as_secs_f64();
                let start = Instant::now();
                let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, spec FROM resources WHERE kind = 'port' ORDER BY name, id LIMIT 100",
            )
            .fetch_all(store.pool())
            .await
            .map_err(|e| failed("raw list", e))?;
                std::hint::black_box(rows);
                peer_time += start.elapsed().as_secs_f64();
            }
            let list = Measurement::new(
                "list pages of 100 ports via the API",
                "pages/s",
                true,
                per_sec(pages, api_time),
            )
            .with_peer("raw SQL page read", per_sec(pages, peer_time));
            store.close().await?;
            let mut results = vec![create, list];
            // Ports already in the SQLite fixture's subnet would make the
            // comparison unequal: both backends start from empty stores.
            match keel_testkit::PostgresServer::start_durable() {
                Ok(pg) => {
                    let sqlite_dir = scratch.path().join("sqlite");
                    std::fs::create_dir_all(&sqlite_dir)?;
                    let sqlite = fixture(&sqlite_dir).await?;
                    let postgres =
                        fixture_on(Store::connect(&pg.url()).await?, scratch.path()).await?;
                    results.extend(backends(&postgres, &sqlite, creates).await?);
                    postgres.store.close().await?;
                    sqlite.store.close().await?;
                }
                Err(e) => eprintln!("control: PostgreSQL measurements skipped: {e}"),
            }
            Ok(results)
        })
        .and_then(|mut results| {
            results.push(super::control_fanout::measurement(scale)?);
            results.push(super::control_rss::measurement(scale)?);
            Ok(results)
        })
}

/// Creates `count` ports in `fx`'s subnet (names from `first`), recording
/// each create's latency in seconds.
async fn create_ports(
    fx: &Fixture,
    first: usize,
    count: usize,
    latencies: &mut Vec<f64>,
) -> Result<(), BenchError> {
    for i in first..first + count {
        let body = serde_json::json!({"name": format!("p{i}"), "subnet_id": fx.subnet});
        let start = Instant::now();
        let (status, reply) = call(
            &fx.app,
            "POST",
            "/api/v1/ports",
            Some(&fx.token),
            Some(body),
        )
        .await?;
        latencies.push(start.elapsed().as_secs_f64());
        if status != 201 {
            return Err(failed("port create", reply));
        }
    }
    Ok(())
}

/// The same API work on PostgreSQL (fsync on, loopback) and on the embedded
/// SQLite store, alternating rounds so noise hits both alike.
async fn backends(
    postgres: &Fixture,
    sqlite: &Fixture,
    creates: usize,
) -> Result<Vec<Measurement>, BenchError> {
    let (mut pg, mut sq) = (Vec::new(), Vec::new());
    for round in 0..creates / 10 {
        create_ports(postgres, round * 10, 10, &mut pg).await?;
        create_ports(sqlite, round * 10, 10, &mut sq).await?;
    }
    let total = |l: &[f64]| l.iter().sum::<f64>();
    let create = Measurement::new(
        &format!("port creates via the API on PostgreSQL ({creates} ports)"),
        "creates/s",
        true,
        per_sec(pg.len(), total(&pg)),
    )
    .with_peer("same on embedded SQLite", per_sec(sq.len(), total(&sq)));
    let p99 = Measurement::new(
        "p99 port create latency on PostgreSQL",
        "ms",
        false,
        percentile(&mut pg, 990) * 1e3,
    )
    .with_peer("same on embedded SQLite", percentile(&mut sq, 990) * 1e3);
    let pages = 50;
    let (mut pg_time, mut sq_time) = (0.0, 0.0);
    for _ in 0..pages {
        for (fx, time) in [(postgres, &mut pg_time), (sqlite, &mut sq_time)] {
            let start = Instant::now();
            let (status, page) = call(
                &fx.app,
                "GET",
                "/api/v1/ports?limit=100&sort=name",
                Some(&fx.token),
                None,
            )
            .await?;
            *time += start.elapsed().as_secs_f64();
            if status != 200 {
                return Err(failed("list", page));
            }
        }
    }
    let list = Measurement::new(
        "list pages of 100 ports via the API on PostgreSQL",
        "pages/s",
        true,
        per_sec(pages, pg_time),
    )
    .with_peer("same on embedded SQLite", per_sec(pages, sq_time));
    Ok(vec![create, p99, list])
}

/// The `per_mille`-th per-mille value (nearest rank).
fn percentile(values: &mut [f64], per_mille: usize) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = (values.len() * per_mille).div_ceil(1000);
    values
        .get(rank.saturating_sub(1).min(values.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

fn per_sec(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}
