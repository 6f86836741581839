//! In-process contract tests of the management API (`oneshot` against the
//! real router and a real SQLite store in a temporary directory). The whole
//! suite runs a second time against a real PostgreSQL server
//! ([`contract_suite_passes_on_postgresql`]): each test then gets its own
//! database on it.

use std::collections::HashSet;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{app, AppState};
use crate::store::Store;

const ADMIN_PW: &str = "Root-secret-pw-1";
/// Set (to the server's URL) in the child run against PostgreSQL.
const POSTGRES_ENV: &str = "KEEL_CONTRACT_POSTGRES";

/// The store of one test: SQLite in `dir`, or a fresh database on the
/// PostgreSQL server of the second run.
async fn test_store(dir: &std::path::Path) -> Store {
    let Ok(url) = std::env::var(POSTGRES_ENV) else {
        return Store::open(&dir.join("keel.db")).await.unwrap();
    };
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let name = format!("c{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::AnyConnection::connect(&url).await.unwrap();
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    admin.close().await.unwrap();
    let (server, _) = url.rsplit_once('/').unwrap();
    Store::connect(&format!("{server}/{name}")).await.unwrap()
}

#[test]
fn contract_suite_passes_on_postgresql() {
    if std::env::var(POSTGRES_ENV).is_ok() {
        return; // this is the child run
    }
    let pg = keel_testkit::PostgresServer::start().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["api::contract_tests::", "--test-threads", "2"])
        .env(POSTGRES_ENV, pg.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let passed: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 20, "only {passed} contract tests ran:\n{stdout}");
}
const PW: &str = "Tenant-password-1";

struct Api {
    app: Router,
    state: AppState,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn etag(&self) -> String {
        self.headers["etag"].to_str().unwrap().to_owned()
    }
    fn id(&self) -> String {
        self.body["id"].as_str().unwrap().to_owned()
    }
}

impl Api {
    async fn new() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store = test_store(dir.path()).await;
        super::auth::bootstrap_admin(&store, Some(ADMIN_PW.into()))
            .await
            .unwrap();
        let version = super::version::Version {
            version: "test".into(),
            api_version: "v1".into(),
            schema_version: 3,
            instance_id: uuid::Uuid::new_v4(),
        };
        let state = AppState::new(store, version, dir.path().to_owned());
        Api {
            app: app(state.clone()),
            state,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        self.call_from(None, method, path, token, headers, body)
            .await
    }

    /// As [`Api::call`], from the client address `from` (as the server's
    /// connection info gives it).
    async fn call_from(
        &self,
        from: Option<&str>,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(ip) = from {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let addr = std::net::SocketAddr::new(ip, 40000);
            req = req.extension(axum::extract::ConnectInfo(addr));
        }
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), &[], None).await
    }
    async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(token), &[], Some(body))
            .await
    }

    async fn login(&self, user: &str, password: &str) -> Reply {
        self.call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            &[],
            Some(json!({"username": user, "password": password})),
        )
        .await
    }

    async fn token(&self, user: &str, password: &str) -> String {
        let r = self.login(user, password).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    async fn admin(&self) -> String {
        self.token("admin", ADMIN_PW).await
    }

    /// POSTs a resource that must be created; returns its id.
    async fn create(&self, path: &str, token: &str, body: Value) -> String {
        let r = self.post(path, token, body).await;
        assert_eq!(r.status, 201, "POST {path}: {}", r.body);
        r.id()
    }

    /// Registers a live x86_64 host (4 cores, 8 GiB) as its agent would.
    async fn host(&self, name: &str) {
        let inventory: super::hosts::HostInventory = serde_json::from_value(json!({
            "hostname": name, "cpu_arch": "x86_64", "cpu_vendor": "v", "cpu_model": "m",
            "cores": 4, "sockets": 1, "memory_bytes": 8u64 << 30, "numa_nodes": [], "nics": [],
            "disks": [], "gpus": [], "kvm": false, "agent_version": "test"
        }))
        .unwrap();
        let mut tx = self.state.store.begin_write().await.unwrap();
        super::hosts::register(&mut tx, name, inventory)
            .await
            .unwrap();
        super::hosts::heartbeat(&mut tx, name).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn vdc(&self, admin: &str, name: &str, quota: Value) -> String {
        let r = self
            .post("/api/v1/vdcs", admin, json!({"name": name, "quota": quota}))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.id()
    }

    async fn user(&self, admin: &str, name: &str, role: &str, vdc: &str) -> String {
        let r = self
            .post(
                "/api/v1/users",
                admin,
                json!({"name": name, "password": PW, "role": role, "vdc_id": vdc}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        self.token(name, PW).await
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(self.state.store.pool())
            .await
            .unwrap()
    }
}

fn assert_problem(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.body["code"], code, "{}", r.body);
    assert_eq!(r.body["status"], status);
}

#[tokio::test]
async fn totp_second_factor_is_confirmed_required_single_use_and_disabled() {
    use totp_rs::{Algorithm, Secret, TOTP};
    // Codes for the previous, current and next 30 s step are accepted; keep
    // clear of a step boundary so "current" means the same to test and API.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    while now() % 30 > 25 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "t", json!({})).await;
    let token = api.user(&admin, "otp-user", "vdc-user", &vdc).await;
    let r = api
        .call(
            Method::POST,
            "/api/v1/auth/totp/confirm",
            Some(&token),
            &[],
            Some(json!({"code": "123456"})),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .call(Method::POST, "/api/v1/auth/totp", Some(&token), &[], None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    assert!(
        r.body["otpauth_uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/keel:otp-user?secret="),
        "{}",
        r.body
    );
    let gen = TOTP::new(
        Algorithm::SHA1,
        6,
        0,
        30,
        Secret::Encoded(secret).to_bytes().unwrap(),
    )
    .unwrap();
    let code = |steps: i64| gen.generate(now().checked_add_signed(steps * 30).unwrap());
    let wrong = if code(0) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let confirm = |c: String| {
        api.call(
            Method::POST,
            "/api/v1/auth/totp/confirm",
            Some(&token),
            &[],
            Some(json!({"code": c})),
        )
    };
    assert_problem(&confirm(wrong.into()).await, 422, "invalid-field");
    assert_eq!(confirm(code(-1)).await.status, 204);
    // From now on the password alone is not enough.
    let login = |c: Option<String>| {
        api.call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            &[],
            Some(json!({"username": "otp-user", "password": PW, "totp": c})),
        )
    };
    assert_problem(&login(None).await, 401, "totp-required");
    assert_problem(&login(Some(wrong.into())).await, 401, "bad-credentials");
    let r = login(Some(code(0))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The same code again (replay) and an older one are refused.
    assert_problem(&login(Some(code(0))).await, 401, "bad-credentials");
    assert_problem(&login(Some(code(-1))).await, 401, "bad-credentials");
    let disable = |c: String| {
        api.call(
            Method::POST,
            "/api/v1/auth/totp/disable",
            Some(&token),
            &[],
            Some(json!({"code": c})),
        )
    };
    assert_problem(&disable(code(0)).await, 422, "invalid-field");
    assert_eq!(disable(code(1)).await.status, 204);
    let r = login(None).await;
    assert_eq!(r.status, 200, "TOTP off: password alone again: {}", r.body);
}

#[tokio::test]
async fn login_refresh_and_lockout() {
    let api = Api::new().await;
    assert_problem(
        &api.login("admin", "wrong-password-1").await,
        401,
        "bad-credentials",
    );
    assert_problem(&api.login("nobody", ADMIN_PW).await, 401, "bad-credentials");
    let r = api.login("admin", ADMIN_PW).await;
    assert_eq!(r.status, 200);
    let refresh = r.body["refresh_token"].as_str().unwrap().to_owned();
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(api.get("/api/v1/vdcs", &access).await.status, 200);
    // A refresh token is not a bearer token and works exactly once.
    assert_problem(
        &api.get("/api/v1/vdcs", &refresh).await,
        401,
        "unauthenticated",
    );
    let body = json!({"refresh_token": refresh});
    let r = api
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            &[],
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let again = api
        .call(Method::POST, "/api/v1/auth/refresh", None, &[], Some(body))
        .await;
    assert_problem(&again, 401, "unauthenticated");

    // Five failures lock the account, even against the right password.
    for _ in 0..super::auth::LOCKOUT_AFTER {
        assert_problem(
            &api.login("admin", "wrong-password-1").await,
            401,
            "bad-credentials",
        );
    }
    assert_problem(&api.login("admin", ADMIN_PW).await, 429, "account-locked");
    // Tokens issued before the lockout still work (the lock guards logins).
    assert_eq!(api.get("/api/v1/vdcs", &access).await.status, 200);
}

#[tokio::test]
async fn public_and_protected_endpoints() {
    let api = Api::new().await;
    for path in ["/healthz", "/api/v1/version", "/api/v1/openapi.json"] {
        let r = api.call(Method::GET, path, None, &[], None).await;
        assert_eq!(r.status, 200, "{path}");
    }
    for path in [
        "/api/v1/vdcs",
        "/api/v1/users",
        "/api/v1/vpcs",
        "/api/v1/events",
        "/api/v1/tokens",
    ] {
        let r = api.call(Method::GET, path, None, &[], None).await;
        assert_problem(&r, 401, "unauthenticated");
    }
    let r = api.get("/api/v1/vdcs", "keela_forged").await;
    assert_problem(&r, 401, "unauthenticated");
}

#[tokio::test]
async fn password_policy_and_user_rules() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    for (password, why) in [
        ("short-1A", "12"),
        ("alice-Password-1", "user name"),
        ("alllowercaseletters", "two of"),
    ] {
        let r = api
            .post(
                "/api/v1/users",
                &admin,
                json!({"name": "alice", "password": password, "role": "vdc-user", "vdc_id": vdc}),
            )
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], "password");
        assert!(
            r.body["detail"].as_str().unwrap().contains(why),
            "{}",
            r.body
        );
    }
    let r = api
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "root2", "password": PW, "role": "system-admin", "vdc_id": vdc}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    let vadmin = api.user(&admin, "va", "vdc-admin", &vdc).await;
    // A VDC admin cannot mint system admins.
    let r = api
        .post(
            "/api/v1/users",
            &vadmin,
            json!({"name": "root3", "password": PW, "role": "system-admin"}),
        )
        .await;
    assert_problem(&r, 403, "forbidden");
    // ...but creates users in its own VDC by default.
    let r = api
        .post(
            "/api/v1/users",
            &vadmin,
            json!({"name": "bob", "password": PW, "role": "vdc-user"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["vdc_id"], vdc.as_str());
    assert!(r.body.get("password_hash").is_none() && r.body.get("password").is_none());
    let dup = api
        .post(
            "/api/v1/users",
            &vadmin,
            json!({"name": "bob", "password": PW, "role": "vdc-user"}),
        )
        .await;
    assert_problem(&dup, 409, "conflict");
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE name = 'bob'")
        .fetch_one(api.state.store.pool())
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
}

#[tokio::test]
async fn bad_input_is_refused_precisely_and_creates_nothing() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let vpc = api
        .post(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "net", "vdc_id": vdc}),
        )
        .await;
    assert_eq!(vpc.status, 201);
    let vpc = vpc.id();
    let resources = api.count("resources").await;
    let events = api.count("events").await;

    let r = api
        .post(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "x", "vdc_id": vdc, "colour": "red"}),
        )
        .await;
    assert_problem(&r, 400, "bad-json");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{}",
        r.body
    );
    let r = api
        .call(
            Method::POST,
            "/api/v1/vpcs",
            Some(&admin),
            &[("content-type", "application/json")],
            None,
        )
        .await;
    assert_problem(&r, 400, "bad-json");
    let r = api
        .post(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "-bad name", "vdc_id": vdc}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "name");
    let r = api
        .post(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "x", "vdc_id": "no-such-vdc"}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "vdc_id");

    let subnet = |extra: Value| {
        let mut body = json!({"name": "s", "vpc_id": vpc, "cidr": "10.0.0.0/24"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (extra, field, needle) in [
        (
            json!({"cidr": "10.0.0.300/24"}),
            "cidr",
            "not an IPv4 or IPv6 CIDR",
        ),
        (
            json!({"cidr": "10.0.0.5/24"}),
            "cidr",
            "did you mean 10.0.0.0/24",
        ),
        (json!({"cidr": "10.0.0.0/32"}), "cidr", "prefix too long"),
        (
            json!({"gateway_ip": "10.0.1.1"}),
            "gateway_ip",
            "inside 10.0.0.0/24",
        ),
        (
            json!({"gateway_ip": "10.0.0.255"}),
            "gateway_ip",
            "not a host address",
        ),
        (
            json!({"allocation_pools": [{"start": "10.0.0.10", "end": "10.0.0.5"}]}),
            "allocation_pools[0]",
            "after end",
        ),
        (
            json!({"allocation_pools": [{"start": "10.0.0.1", "end": "10.0.0.9"}]}),
            "allocation_pools[0]",
            "gateway",
        ),
        (
            json!({"allocation_pools": [{"start": "10.0.0.10", "end": "10.0.1.9"}]}),
            "allocation_pools[0]",
            "inside",
        ),
        (
            json!({"allocation_pools": [{"start": "10.0.0.10", "end": "10.0.0.20"}, {"start": "10.0.0.20", "end": "10.0.0.30"}]}),
            "allocation_pools[1]",
            "overlaps",
        ),
        (
            json!({"reserved_ips": ["10.0.0.7", "10.0.0.7"]}),
            "reserved_ips[1]",
            "twice",
        ),
        (
            json!({"reserved_ips": ["192.168.0.1"]}),
            "reserved_ips[0]",
            "inside",
        ),
        (
            json!({"cidr": "fd00::/64", "gateway_ip": "fd01::1"}),
            "gateway_ip",
            "inside",
        ),
    ] {
        let r = api
            .post("/api/v1/subnets", &admin, subnet(extra.clone()))
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{extra}: {}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains(needle),
            "{extra}: {}",
            r.body
        );
    }
    assert_eq!(
        api.count("resources").await,
        resources,
        "nothing half-created"
    );
    assert_eq!(
        api.count("events").await,
        events,
        "no event for a failed create"
    );

    // A valid one, then overlaps (v4 and v6) within the VPC are conflicts.
    let r = api.post("/api/v1/subnets", &admin, subnet(json!({}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["gateway_ip"], "10.0.0.1");
    assert_eq!(
        r.body["allocation_pools"],
        json!([{"start": "10.0.0.2", "end": "10.0.0.254"}])
    );
    assert_eq!(r.body["enable_dhcp"], true);
    let r = api
        .post(
            "/api/v1/subnets",
            &admin,
            subnet(json!({"name": "s2", "cidr": "10.0.0.128/25"})),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    let v6 = api
        .post("/api/v1/subnets", &admin, subnet(json!({"name": "v6", "cidr": "fd00:1::/64", "gateway_ip": null, "dns_servers": ["fd00::53"]})))
        .await;
    assert_eq!(v6.status, 201, "{}", v6.body);
    assert_eq!(v6.body["gateway_ip"], Value::Null);
    let r = api
        .post(
            "/api/v1/subnets",
            &admin,
            subnet(json!({"name": "v6b", "cidr": "fd00::/16"})),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    // Gateway in the middle: the default pools go around it.
    let r = api
        .post(
            "/api/v1/subnets",
            &admin,
            subnet(json!({"name": "mid", "cidr": "10.1.0.0/29", "gateway_ip": "10.1.0.3"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["allocation_pools"],
        json!([{"start": "10.1.0.1", "end": "10.1.0.2"}, {"start": "10.1.0.4", "end": "10.1.0.6"}])
    );

    // Bad queries.
    assert_problem(
        &api.get("/api/v1/vpcs?limit=0", &admin).await,
        400,
        "invalid-query",
    );
    assert_problem(
        &api.get("/api/v1/vpcs?sort=colour", &admin).await,
        400,
        "invalid-query",
    );
    assert_problem(
        &api.get("/api/v1/vpcs?cursor=zz", &admin).await,
        400,
        "invalid-query",
    );
    assert_problem(
        &api.get("/api/v1/vpcs?bogus=1", &admin).await,
        400,
        "invalid-query",
    );
}

#[tokio::test]
async fn network_resources_are_never_reported_active() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let vpc = api
        .post(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "net", "vdc_id": vdc}),
        )
        .await;
    assert_eq!(vpc.body["status"], "PENDING");
    assert!(vpc.body["status_reason"]
        .as_str()
        .unwrap()
        .contains("not realized"));
    let s = api
        .post(
            "/api/v1/subnets",
            &admin,
            json!({"name": "s", "vpc_id": vpc.id(), "cidr": "10.0.0.0/24"}),
        )
        .await;
    assert_eq!(s.body["status"], "PENDING");
    let vdc_body = api.get(&format!("/api/v1/vdcs/{vdc}"), &admin).await;
    assert_eq!(vdc_body.body["status"], "READY");
}

#[tokio::test]
async fn etag_and_if_match() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let path = format!("/api/v1/vdcs/{vdc}");
    let r = api.get(&path, &admin).await;
    assert_eq!(r.etag(), "\"1\"");
    let patch = json!({"description": "first"});
    let none = api
        .call(Method::PATCH, &path, Some(&admin), &[], Some(patch.clone()))
        .await;
    assert_problem(&none, 428, "if-match-required");
    let stale = api
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            &[("if-match", "\"7\"")],
            Some(patch.clone()),
        )
        .await;
    assert_problem(&stale, 412, "revision-mismatch");
    let ok = api
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            Some(patch.clone()),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.etag(), "\"2\"");
    assert_eq!(ok.body["revision"], 2);
    assert_eq!(ok.body["description"], "first");
    // The writer that read revision 1 loses.
    let lost = api
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            Some(json!({"description": "second"})),
        )
        .await;
    assert_problem(&lost, 412, "revision-mismatch");
    let del = api
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_problem(&del, 412, "revision-mismatch");
    let del = api
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            &[("if-match", "\"2\"")],
            None,
        )
        .await;
    assert_eq!(del.status, 204);
    assert_problem(&api.get(&path, &admin).await, 404, "not-found");
}

#[tokio::test]
async fn idempotency_key_replays_and_refuses_a_different_body() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let body = json!({"name": "net", "vdc_id": vdc});
    let key = [("idempotency-key", "k-1")];
    let first = api
        .call(
            Method::POST,
            "/api/v1/vpcs",
            Some(&admin),
            &key,
            Some(body.clone()),
        )
        .await;
    assert_eq!(first.status, 201);
    let again = api
        .call(
            Method::POST,
            "/api/v1/vpcs",
            Some(&admin),
            &key,
            Some(body.clone()),
        )
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["location"], first.headers["location"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let other = api
        .call(
            Method::POST,
            "/api/v1/vpcs",
            Some(&admin),
            &key,
            Some(json!({"name": "other", "vdc_id": vdc})),
        )
        .await;
    assert_problem(&other, 422, "idempotency-key-reused");
    let list = api.get("/api/v1/vpcs", &admin).await;
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        1,
        "created once"
    );
    // Keys are per caller: another user's identical key is a new request.
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    let theirs = api
        .call(
            Method::POST,
            "/api/v1/vpcs",
            Some(&tenant),
            &key,
            Some(json!({"name": "net2"})),
        )
        .await;
    assert_eq!(theirs.status, 201, "{}", theirs.body);
}

#[tokio::test]
async fn quotas_are_enforced_at_create_and_nest() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api
        .vdc(&admin, "acme", json!({"networks": 2, "vcpus": 8}))
        .await;
    for name in ["a", "b"] {
        let r = api
            .post("/api/v1/vpcs", &admin, json!({"name": name, "vdc_id": vdc}))
            .await;
        assert_eq!(r.status, 201);
    }
    let r = api
        .post("/api/v1/vpcs", &admin, json!({"name": "c", "vdc_id": vdc}))
        .await;
    assert_problem(&r, 409, "quota-exceeded");
    assert_eq!(r.body["field"], "quota.networks");
    // Lowering a quota below use is refused; a child cannot exceed its parent.
    let path = format!("/api/v1/vdcs/{vdc}");
    let r = api
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            Some(json!({"quota": {"networks": 1}})),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    let r = api
        .post(
            "/api/v1/vdcs",
            &admin,
            json!({"name": "child", "parent_id": vdc, "quota": {"networks": 1, "vcpus": 16}}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "quota.vcpus");
    let r = api
        .post(
            "/api/v1/vdcs",
            &admin,
            json!({"name": "child", "parent_id": vdc, "quota": {"networks": 1, "vcpus": 4}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["parent_id"], vdc.as_str());
    // A VDC that still contains things cannot go.
    let r = api
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
}

#[tokio::test]
async fn pagination_sort_filter_and_search() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let names = ["delta", "alpha", "echo", "charlie", "bravo"];
    for name in names {
        let r = api
            .post("/api/v1/vpcs", &admin, json!({"name": name, "vdc_id": vdc}))
            .await;
        assert_eq!(r.status, 201);
    }
    for (sort, expected) in [
        ("name", vec!["alpha", "bravo", "charlie", "delta", "echo"]),
        ("-name", vec!["echo", "delta", "charlie", "bravo", "alpha"]),
        ("created_at", names.to_vec()),
    ] {
        let mut seen = Vec::new();
        let mut url = format!("/api/v1/vpcs?limit=2&sort={sort}");
        let mut pages = 0;
        loop {
            let r = api.get(&url, &admin).await;
            assert_eq!(r.status, 200, "{}", r.body);
            pages += 1;
            for item in r.body["items"].as_array().unwrap() {
                seen.push(item["name"].as_str().unwrap().to_owned());
            }
            match r.body["next_cursor"].as_str() {
                Some(c) => url = format!("/api/v1/vpcs?limit=2&sort={sort}&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(seen, expected, "sort {sort}");
        assert_eq!(pages, 3);
    }
    let r = api.get("/api/v1/vpcs?q=HAR", &admin).await;
    let found: Vec<_> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].clone())
        .collect();
    assert_eq!(found, vec![json!("charlie")]);
    let r = api.get("/api/v1/vpcs?name=echo", &admin).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    let r = api.get("/api/v1/vpcs?status=ACTIVE", &admin).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 0);
    let r = api
        .get(&format!("/api/v1/vpcs?vdc_id={vdc}&status=PENDING"), &admin)
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 5);
    // A cursor of one sort is refused for another.
    let r = api.get("/api/v1/vpcs?limit=2&sort=name", &admin).await;
    let c = r.body["next_cursor"].as_str().unwrap();
    assert_problem(
        &api.get(&format!("/api/v1/vpcs?cursor={c}"), &admin).await,
        400,
        "invalid-query",
    );
}

#[tokio::test]
async fn events_follow_changes_and_respect_tenancy() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let a = api.vdc(&admin, "a", json!({})).await;
    let b = api.vdc(&admin, "b", json!({})).await;
    let ta = api.user(&admin, "ua", "vdc-user", &a).await;
    let start = api.get("/api/v1/events", &admin).await;
    let last = start.body.as_array().unwrap().last().unwrap()["seq"]
        .as_i64()
        .unwrap();
    let vpc_a = api.create("/api/v1/vpcs", &ta, json!({"name": "na"})).await;
    let vpc_b = api
        .create("/api/v1/vpcs", &admin, json!({"name": "nb", "vdc_id": b}))
        .await;
    let path = format!("/api/v1/vpcs/{vpc_a}");
    let r = api
        .call(
            Method::PATCH,
            &path,
            Some(&ta),
            &[("if-match", "\"1\"")],
            Some(json!({"description": "x"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = api
        .call(
            Method::DELETE,
            &path,
            Some(&ta),
            &[("if-match", "\"2\"")],
            None,
        )
        .await;
    assert_eq!(r.status, 204);

    let all = api
        .get(&format!("/api/v1/events?after={last}"), &admin)
        .await;
    let got: Vec<_> = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["resource_id"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["revision"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (vpc_a.clone(), "created".into(), 1),
            (vpc_b.clone(), "created".into(), 1),
            (vpc_a.clone(), "updated".into(), 2),
            (vpc_a.clone(), "deleted".into(), 3),
        ]
    );
    let seqs: Vec<i64> = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // The tenant sees only its own VDC's changes.
    let theirs = api.get(&format!("/api/v1/events?after={last}"), &ta).await;
    assert!(theirs
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["vdc_id"] == a.as_str()));
    assert_eq!(theirs.body.as_array().unwrap().len(), 3);
    // Resume after the second one.
    let r = api
        .get(&format!("/api/v1/events?after={}", seqs[1]), &admin)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
}

/// Reads SSE frames until `n` `change` events arrived.
async fn sse_events(body: &mut Body, n: usize) -> Vec<Value> {
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(30), body.frame())
            .await
            .expect("event within 30 s")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    events
}

#[tokio::test]
async fn event_stream_pushes_live_changes_and_resumes() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let req = Request::get("/api/v1/events/stream?after=0")
        .header("authorization", format!("Bearer {admin}"))
        .body(Body::empty())
        .unwrap();
    let response = api.app.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = response.into_body();
    // History first: the admin user and the VDC.
    let history = sse_events(&mut body, 2).await;
    assert_eq!(history[1]["resource_id"], vdc.as_str());
    // Then a change made while the stream is open.
    let vpc = api
        .create(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "live", "vdc_id": vdc}),
        )
        .await;
    let live = sse_events(&mut body, 1).await;
    assert_eq!(live[0]["resource_id"], vpc.as_str());
    assert_eq!(live[0]["action"], "created");
    drop(body);

    // Reconnecting with Last-Event-ID gets only what came after it.
    let resume = history[1]["seq"].as_i64().unwrap().to_string();
    let req = Request::get("/api/v1/events/stream")
        .header("authorization", format!("Bearer {admin}"))
        .header("last-event-id", resume)
        .body(Body::empty())
        .unwrap();
    let mut body = api.app.clone().oneshot(req).await.unwrap().into_body();
    let resumed = sse_events(&mut body, 1).await;
    assert_eq!(resumed[0]["resource_id"], vpc.as_str());
}

#[tokio::test]
async fn every_mutating_call_is_audited() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    api.post(
        "/api/v1/vpcs",
        &admin,
        json!({"name": "-bad", "vdc_id": vdc}),
    )
    .await;
    let r = api.get("/api/v1/audit", &admin).await;
    let entries: Vec<(String, String, String, i64)> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["principal"].as_str().unwrap().into(),
                e["method"].as_str().unwrap().into(),
                e["path"].as_str().unwrap().into(),
                e["status"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (
                "anonymous".into(),
                "POST".into(),
                "/api/v1/auth/login".into(),
                200
            ),
            ("admin".into(), "POST".into(), "/api/v1/vdcs".into(), 201),
            ("admin".into(), "POST".into(), "/api/v1/vpcs".into(), 422),
        ]
    );
    assert!(r.body[0]["remote"].is_string());
    let tenant = api.user(&admin, "ann", "vdc-admin", &vdc).await;
    assert_problem(&api.get("/api/v1/audit", &tenant).await, 403, "forbidden");
}

#[tokio::test]
async fn api_tokens_authenticate_until_revoked() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let r = api
        .post(
            "/api/v1/tokens",
            &admin,
            json!({"name": "ci", "expires_in_days": 30}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let secret = r.body["token"].as_str().unwrap().to_owned();
    let id = r.id();
    assert_eq!(api.get("/api/v1/vdcs", &secret).await.status, 200);
    let list = api.get("/api/v1/tokens", &admin).await;
    assert_eq!(list.body[0]["name"], "ci");
    assert!(
        list.body[0].get("token").is_none(),
        "secret shown only once"
    );
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE hash = $1")
        .bind(&secret)
        .fetch_one(api.state.store.pool())
        .await
        .unwrap();
    assert_eq!(stored, 0, "only the hash is stored");
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&admin),
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    assert_problem(
        &api.get("/api/v1/vdcs", &secret).await,
        401,
        "unauthenticated",
    );
    let r = api
        .post(
            "/api/v1/tokens",
            &admin,
            json!({"name": "ci", "expires_in_days": 0}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
}

/// Every role × every endpoint × own/other VDC. Expectations are written
/// out here by hand, independently of the policy table.
#[tokio::test]
async fn authorization_matrix() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let own = api.vdc(&admin, "own", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let vadmin = api.user(&admin, "vadmin", "vdc-admin", &own).await;
    let vuser = api.user(&admin, "vuser", "vdc-user", &own).await;
    let victim_other = api.user(&admin, "victim-other", "vdc-user", &other).await;
    let _ = victim_other;
    let users = api.get("/api/v1/users", &admin).await;
    let user_id = |name: &str| {
        users.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (own_user, other_user) = (user_id("vuser"), user_id("victim-other"));

    // Fresh fixtures per check, so deletes do not affect later rows.
    async fn fixtures(
        api: &Api,
        admin: &str,
        vdc: &str,
        tag: &str,
    ) -> (String, String, String, String) {
        let vpc = api
            .create(
                "/api/v1/vpcs",
                admin,
                json!({"name": format!("v{tag}"), "vdc_id": vdc}),
            )
            .await;
        let subnet = api
            .create(
                "/api/v1/subnets",
                admin,
                json!({"name": format!("s{tag}"), "vpc_id": vpc, "cidr": "10.0.0.0/24"}),
            )
            .await;
        let sg = api
            .create(
                "/api/v1/security-groups",
                admin,
                json!({"name": format!("g{tag}"), "vdc_id": vdc}),
            )
            .await;
        let port = api
            .create(
                "/api/v1/ports",
                admin,
                json!({"name": format!("p{tag}"), "subnet_id": subnet}),
            )
            .await;
        (vpc, subnet, sg, port)
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        ListVdcs,
        GetVdc,
        CreateVdc,
        PatchVdc,
        DeleteVdc,
        ListUsers,
        GetUser,
        CreateUser,
        PatchUser,
        DeleteUser,
        ListVpcs,
        GetVpc,
        CreateVpc,
        PatchVpc,
        DeleteVpc,
        ListSubnets,
        GetSubnet,
        CreateSubnet,
        PatchSubnet,
        DeleteSubnet,
        ListEvents,
        Audit,
        CreateToken,
        CreateSg,
        GetSg,
        PatchSg,
        DeleteSg,
        CreatePort,
        CreateRouter,
        GetPort,
        PatchPort,
        DeletePort,
    }
    use Op::*;
    // (op, [system-admin, vdc-admin, vdc-user] on own VDC, same on the other VDC)
    let matrix: &[(Op, [u16; 3], [u16; 3])] = &[
        (ListVdcs, [200, 200, 200], [200, 200, 200]),
        (GetVdc, [200, 200, 200], [200, 404, 404]),
        (CreateVdc, [201, 403, 403], [201, 403, 403]),
        (PatchVdc, [200, 403, 403], [200, 404, 404]),
        (DeleteVdc, [409, 403, 403], [409, 404, 404]),
        (ListUsers, [200, 200, 200], [200, 200, 200]),
        (GetUser, [200, 200, 200], [200, 404, 404]),
        (CreateUser, [201, 201, 403], [201, 422, 403]),
        (PatchUser, [200, 200, 403], [200, 404, 404]),
        (DeleteUser, [204, 204, 403], [204, 404, 404]),
        (ListVpcs, [200, 200, 200], [200, 200, 200]),
        (GetVpc, [200, 200, 200], [200, 404, 404]),
        (CreateVpc, [201, 201, 201], [201, 422, 422]),
        (PatchVpc, [200, 200, 200], [200, 404, 404]),
        (DeleteVpc, [409, 409, 409], [409, 404, 404]),
        (ListSubnets, [200, 200, 200], [200, 200, 200]),
        (GetSubnet, [200, 200, 200], [200, 404, 404]),
        (CreateSubnet, [201, 201, 201], [201, 422, 422]),
        (PatchSubnet, [200, 200, 200], [200, 404, 404]),
        (DeleteSubnet, [409, 409, 409], [409, 404, 404]),
        (ListEvents, [200, 200, 200], [200, 200, 200]),
        (Audit, [200, 403, 403], [200, 403, 403]),
        (CreateToken, [201, 201, 201], [201, 201, 201]),
        (CreateSg, [201, 201, 201], [201, 422, 422]),
        (GetSg, [200, 200, 200], [200, 404, 404]),
        (PatchSg, [200, 200, 200], [200, 404, 404]),
        (DeleteSg, [204, 204, 204], [204, 404, 404]),
        (CreatePort, [201, 201, 201], [201, 422, 422]),
        (GetPort, [200, 200, 200], [200, 404, 404]),
        (PatchPort, [200, 200, 200], [200, 404, 404]),
        (DeletePort, [204, 204, 204], [204, 404, 404]),
        (CreateRouter, [201, 201, 201], [201, 422, 422]),
    ];
    let roles = [
        ("system-admin", admin.clone()),
        ("vdc-admin", vadmin.clone()),
        ("vdc-user", vuser.clone()),
    ];
    let mut n = 0;
    let mut failures = Vec::new();
    for (op, on_own, on_other) in matrix {
        for (scope, expected, vdc) in [("own", on_own, &own), ("other", on_other, &other)] {
            for (i, (role, token)) in roles.iter().enumerate() {
                n += 1;
                let tag = n.to_string();
                let (vpc, subnet, sg, port) = fixtures(&api, &admin, vdc, &tag).await;
                // A throwaway user to patch/delete in the VDC under test.
                let target = api.create("/api/v1/users", &admin, json!({"name": format!("t{tag}"), "password": PW, "role": "vdc-user", "vdc_id": vdc})).await;
                let _ = (&own_user, &other_user);
                let im = [("if-match", "\"1\"")];
                let (m, path, body, headers): (Method, String, Option<Value>, &[(&str, &str)]) =
                    match op {
                        ListVdcs => (Method::GET, "/api/v1/vdcs".into(), None, &[]),
                        GetVdc => (Method::GET, format!("/api/v1/vdcs/{vdc}"), None, &[]),
                        CreateVdc => (
                            Method::POST,
                            "/api/v1/vdcs".into(),
                            Some(json!({"name": format!("c{tag}"), "parent_id": vdc})),
                            &[],
                        ),
                        PatchVdc => {
                            let rev = api.get(&format!("/api/v1/vdcs/{vdc}"), &admin).await.etag();
                            let r = api
                                .call(
                                    Method::PATCH,
                                    &format!("/api/v1/vdcs/{vdc}"),
                                    Some(token),
                                    &[("if-match", &rev)],
                                    Some(json!({"description": tag})),
                                )
                                .await;
                            check(&mut failures, *op, role, scope, expected[i], &r);
                            continue;
                        }
                        DeleteVdc => {
                            let rev = api.get(&format!("/api/v1/vdcs/{vdc}"), &admin).await.etag();
                            let r = api
                                .call(
                                    Method::DELETE,
                                    &format!("/api/v1/vdcs/{vdc}"),
                                    Some(token),
                                    &[("if-match", &rev)],
                                    None,
                                )
                                .await;
                            check(&mut failures, *op, role, scope, expected[i], &r);
                            continue;
                        }
                        ListUsers => (Method::GET, "/api/v1/users".into(), None, &[]),
                        GetUser => (Method::GET, format!("/api/v1/users/{target}"), None, &[]),
                        CreateUser => (
                            Method::POST,
                            "/api/v1/users".into(),
                            Some(
                                json!({"name": format!("n{tag}"), "password": PW, "role": "vdc-user", "vdc_id": vdc}),
                            ),
                            &[],
                        ),
                        PatchUser => (
                            Method::PATCH,
                            format!("/api/v1/users/{target}"),
                            Some(json!({"unlock": true})),
                            &im,
                        ),
                        DeleteUser => {
                            (Method::DELETE, format!("/api/v1/users/{target}"), None, &im)
                        }
                        ListVpcs => (Method::GET, "/api/v1/vpcs".into(), None, &[]),
                        GetVpc => (Method::GET, format!("/api/v1/vpcs/{vpc}"), None, &[]),
                        CreateVpc => (
                            Method::POST,
                            "/api/v1/vpcs".into(),
                            Some(json!({"name": format!("n{tag}"), "vdc_id": vdc})),
                            &[],
                        ),
                        PatchVpc => (
                            Method::PATCH,
                            format!("/api/v1/vpcs/{vpc}"),
                            Some(json!({"description": "d"})),
                            &im,
                        ),
                        DeleteVpc => (Method::DELETE, format!("/api/v1/vpcs/{vpc}"), None, &im),
                        ListSubnets => (Method::GET, "/api/v1/subnets".into(), None, &[]),
                        GetSubnet => (Method::GET, format!("/api/v1/subnets/{subnet}"), None, &[]),
                        CreateSubnet => (
                            Method::POST,
                            "/api/v1/subnets".into(),
                            Some(
                                json!({"name": format!("n{tag}"), "vpc_id": vpc, "cidr": "10.9.0.0/24"}),
                            ),
                            &[],
                        ),
                        PatchSubnet => (
                            Method::PATCH,
                            format!("/api/v1/subnets/{subnet}"),
                            Some(json!({"enable_dhcp": false})),
                            &im,
                        ),
                        DeleteSubnet => (
                            Method::DELETE,
                            format!("/api/v1/subnets/{subnet}"),
                            None,
                            &im,
                        ),
                        ListEvents => (Method::GET, "/api/v1/events".into(), None, &[]),
                        Audit => (Method::GET, "/api/v1/audit".into(), None, &[]),
                        CreateToken => (
                            Method::POST,
                            "/api/v1/tokens".into(),
                            Some(json!({"name": format!("n{tag}")})),
                            &[],
                        ),
                        CreateSg => (
                            Method::POST,
                            "/api/v1/security-groups".into(),
                            Some(json!({"name": format!("n{tag}"), "vdc_id": vdc})),
                            &[],
                        ),
                        GetSg => (
                            Method::GET,
                            format!("/api/v1/security-groups/{sg}"),
                            None,
                            &[],
                        ),
                        PatchSg => (
                            Method::PATCH,
                            format!("/api/v1/security-groups/{sg}"),
                            Some(
                                json!({"rules": [{"direction": "ingress", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22}]}),
                            ),
                            &im,
                        ),
                        DeleteSg => (
                            Method::DELETE,
                            format!("/api/v1/security-groups/{sg}"),
                            None,
                            &im,
                        ),
                        CreatePort => (
                            Method::POST,
                            "/api/v1/ports".into(),
                            Some(json!({"name": format!("n{tag}"), "subnet_id": subnet})),
                            &[],
                        ),
                        GetPort => (Method::GET, format!("/api/v1/ports/{port}"), None, &[]),
                        PatchPort => (
                            Method::PATCH,
                            format!("/api/v1/ports/{port}"),
                            Some(json!({"security_group_ids": [sg]})),
                            &im,
                        ),
                        DeletePort => (Method::DELETE, format!("/api/v1/ports/{port}"), None, &im),
                        CreateRouter => (
                            Method::POST,
                            "/api/v1/routers".into(),
                            Some(
                                json!({"name": format!("n{tag}"), "vdc_id": vdc, "interfaces": [{"subnet_id": subnet}]}),
                            ),
                            &[],
                        ),
                    };
                let r = api.call(m, &path, Some(token), headers, body).await;
                check(&mut failures, *op, role, scope, expected[i], &r);
                // Lists never leak the other VDC.
                if matches!(
                    op,
                    ListVpcs | ListSubnets | ListUsers | ListVdcs | ListEvents
                ) && *role != "system-admin"
                {
                    let items = r.body["items"].as_array().or(r.body.as_array()).unwrap();
                    assert!(
                        items
                            .iter()
                            .all(|it| it["vdc_id"] == own.as_str() || it["id"] == own.as_str()),
                        "{op:?} {role} leaks: {}",
                        r.body
                    );
                }
            }
        }
    }
    fn check(
        failures: &mut Vec<String>,
        op: Op,
        role: &str,
        scope: &str,
        expected: u16,
        r: &Reply,
    ) {
        if r.status.as_u16() != expected {
            failures.push(format!(
                "{op:?} {role} {scope}: expected {expected}, got {} {}",
                r.status, r.body
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(n, matrix.len() * 6);
}

#[tokio::test]
async fn security_group_rules_are_validated() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let rule = |extra: Value| {
        let mut r = json!({"direction": "ingress", "protocol": "tcp"});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        json!({"name": "g", "vdc_id": vdc, "rules": [r]})
    };
    for (extra, field) in [
        (
            json!({"protocol": "icmp", "port_range_min": 1, "port_range_max": 2}),
            "rules[0].port_range_min",
        ),
        (
            json!({"port_range_min": 90, "port_range_max": 80}),
            "rules[0].port_range_min",
        ),
        (
            json!({"port_range_min": 0, "port_range_max": 80}),
            "rules[0].port_range_min",
        ),
        (json!({"port_range_min": 80}), "rules[0].port_range_max"),
        (
            json!({"remote_cidr": "10.0.0.0/33"}),
            "rules[0].remote_cidr",
        ),
        (
            json!({"remote_cidr": "10.0.0.1/24"}),
            "rules[0].remote_cidr",
        ),
        (json!({"icmp_type": 8}), "rules[0].icmp_type"),
        (
            json!({"protocol": "icmp", "icmp_code": 0}),
            "rules[0].icmp_code",
        ),
        (
            json!({"remote_cidr": "10.0.0.0/8", "remote_group_id": "x"}),
            "rules[0].remote_group_id",
        ),
        (
            json!({"remote_group_id": "nope"}),
            "rules[0].remote_group_id",
        ),
    ] {
        let r = api
            .post("/api/v1/security-groups", &admin, rule(extra.clone()))
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{extra}: {}", r.body);
    }
    let r = api
        .post(
            "/api/v1/security-groups",
            &admin,
            rule(json!({"direction": "sideways"})),
        )
        .await;
    assert_problem(&r, 400, "bad-json");
    let dup = json!({"name": "g", "vdc_id": vdc, "rules": [{"direction": "egress", "protocol": "any"}, {"direction": "egress", "protocol": "any"}]});
    let r = api.post("/api/v1/security-groups", &admin, dup).await;
    assert_eq!(r.body["field"], "rules[1]");
    let ok = api
        .post(
            "/api/v1/security-groups",
            &admin,
            rule(json!({"port_range_min": 443, "port_range_max": 443, "remote_cidr": "fd00::/8"})),
        )
        .await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(ok.body["status"], "PENDING");
    // Black and white lists: a deny above an allow; the same match at the
    // same priority with opposite actions is refused (the data plane would).
    let web = json!({"direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 80});
    let mut deny = web.clone();
    deny["action"] = json!("deny");
    let r = api
        .post(
            "/api/v1/security-groups",
            &admin,
            json!({"name": "c", "vdc_id": vdc, "rules": [web, deny]}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "rules[1]", "{}", r.body);
    deny["priority"] = json!(10);
    deny["remote_group_id"] = json!(ok.id());
    let lists = api
        .post(
            "/api/v1/security-groups",
            &admin,
            json!({"name": "lists", "vdc_id": vdc, "rules": [web, deny,
                   {"direction": "ingress", "protocol": "icmp", "icmp_type": 8, "icmp_code": 0}]}),
        )
        .await;
    assert_eq!(lists.status, 201, "{}", lists.body);
    assert_eq!(lists.body["rules"][1]["action"], "deny");
    assert_eq!(lists.body["rules"][1]["priority"], 10);
    // A group other groups name as remote stays.
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/security-groups/{}", ok.id()),
            &admin,
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
}

#[tokio::test]
async fn ports_get_unique_macs_and_valid_addresses() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let vpc = api
        .create("/api/v1/vpcs", &admin, json!({"name": "n", "vdc_id": vdc}))
        .await;
    let subnet = api
        .post("/api/v1/subnets", &admin, json!({"name": "s", "vpc_id": vpc, "cidr": "10.0.0.0/29", "reserved_ips": ["10.0.0.4"]}))
        .await;
    assert_eq!(subnet.status, 201, "{}", subnet.body);
    let subnet = subnet.id();
    let port = |name: &str, extra: Value| {
        let mut b = json!({"name": name, "subnet_id": subnet});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let mut macs = HashSet::new();
    let mut ips = Vec::new();
    let mut ids = Vec::new();
    // Pool .2-.6 minus reserved .4: four addresses, then exhausted.
    for i in 0..4 {
        let r = api
            .post("/api/v1/ports", &admin, port(&format!("p{i}"), json!({})))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let mac = r.body["mac_address"].as_str().unwrap().to_owned();
        assert!(mac.starts_with("fa:16:3e:") && mac.len() == 17, "{mac}");
        assert!(macs.insert(mac));
        ips.push(r.body["fixed_ip"].as_str().unwrap().to_owned());
        ids.push(r.id());
        assert_eq!(r.body["status"], "PENDING");
    }
    assert_eq!(ips, ["10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.6"]);
    let r = api
        .post("/api/v1/ports", &admin, port("full", json!({})))
        .await;
    assert_problem(&r, 409, "conflict");
    for (ip, status, code) in [
        ("10.0.0.1", 422, "invalid-field"), // gateway
        ("10.0.0.4", 422, "invalid-field"), // reserved
        ("10.0.0.7", 422, "invalid-field"), // broadcast
        ("10.0.1.2", 422, "invalid-field"), // outside
        ("10.0.0.3", 409, "conflict"),      // taken
    ] {
        let r = api
            .post("/api/v1/ports", &admin, port("x", json!({"fixed_ip": ip})))
            .await;
        assert_problem(&r, status, code);
        if status == 422 {
            assert_eq!(r.body["field"], "fixed_ip");
        }
    }
    // Deleting a port frees its address; a requested one is honoured.
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/ports/{}", ids[1]),
            Some(&admin),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    let r = api
        .post(
            "/api/v1/ports",
            &admin,
            port("again", json!({"fixed_ip": "10.0.0.3"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);

    // Security groups must be in the port's VDC; a used group cannot go.
    let foreign = api
        .create(
            "/api/v1/security-groups",
            &admin,
            json!({"name": "f", "vdc_id": other}),
        )
        .await;
    let own = api
        .create(
            "/api/v1/security-groups",
            &admin,
            json!({"name": "o", "vdc_id": vdc}),
        )
        .await;
    let path = format!("/api/v1/ports/{}", ids[0]);
    let r = api
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            Some(json!({"security_group_ids": [foreign]})),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "security_group_ids[0]");
    let r = api
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            Some(json!({"security_group_ids": [own]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/security-groups/{own}"),
            Some(&admin),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
    // A subnet with ports cannot go either.
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/subnets/{subnet}"),
            Some(&admin),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
}

#[tokio::test]
async fn routers_attach_subnets_and_check_routes() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let vpc = api
        .create("/api/v1/vpcs", &admin, json!({"name": "n", "vdc_id": vdc}))
        .await;
    let subnet = api
        .create(
            "/api/v1/subnets",
            &admin,
            json!({"name": "s", "vpc_id": vpc, "cidr": "10.0.0.0/24"}),
        )
        .await;
    let v6 = api
        .create(
            "/api/v1/subnets",
            &admin,
            json!({"name": "s6", "vpc_id": vpc, "cidr": "fd00::/64"}),
        )
        .await;
    let other_vpc = api
        .create(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "o", "vdc_id": other}),
        )
        .await;
    let foreign = api
        .create(
            "/api/v1/subnets",
            &admin,
            json!({"name": "f", "vpc_id": other_vpc, "cidr": "10.0.0.0/24"}),
        )
        .await;
    let port = api
        .post(
            "/api/v1/ports",
            &admin,
            json!({"name": "p", "subnet_id": subnet}),
        )
        .await;
    assert_eq!(port.body["fixed_ip"], "10.0.0.2");

    let router = |interfaces: Value, routes: Value| json!({"name": "r", "vdc_id": vdc, "interfaces": interfaces, "routes": routes});
    let ifs = json!([{"subnet_id": subnet}, {"subnet_id": v6}]);
    for (body, field) in [
        (
            router(json!([{"subnet_id": foreign}]), json!([])),
            "interfaces[0].subnet_id",
        ),
        (
            router(
                json!([{"subnet_id": subnet}, {"subnet_id": subnet}]),
                json!([]),
            ),
            "interfaces[1].subnet_id",
        ),
        (
            router(
                json!([{"subnet_id": subnet, "ip_address": "10.0.1.1"}]),
                json!([]),
            ),
            "interfaces[0].ip_address",
        ),
        (
            router(
                ifs.clone(),
                json!([{"destination": "192.168.0.0/16", "nexthop": "172.16.0.1"}]),
            ),
            "routes[0].nexthop",
        ),
        (
            router(
                ifs.clone(),
                json!([{"destination": "192.168.0.0/16", "nexthop": "fd00::9"}]),
            ),
            "routes[0].nexthop",
        ),
        (
            router(
                ifs.clone(),
                json!([{"destination": "192.168.0.1/16", "nexthop": "10.0.0.9"}]),
            ),
            "routes[0].destination",
        ),
        (
            router(
                ifs.clone(),
                json!([{"destination": "192.168.0.0/16", "nexthop": "10.0.0.1"}]),
            ),
            "routes[0].nexthop",
        ),
        (
            router(
                ifs.clone(),
                json!([{"destination": "192.168.0.0/16", "nexthop": "10.0.0.9"}, {"destination": "192.168.0.0/16", "nexthop": "10.0.0.8"}]),
            ),
            "routes[1].destination",
        ),
    ] {
        let r = api.post("/api/v1/routers", &admin, body.clone()).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{body}: {}", r.body);
    }
    // An interface cannot take a port's address.
    let r = api
        .post(
            "/api/v1/routers",
            &admin,
            router(
                json!([{"subnet_id": subnet, "ip_address": "10.0.0.2"}]),
                json!([]),
            ),
        )
        .await;
    assert_problem(&r, 409, "conflict");

    let r = api.post("/api/v1/routers", &admin, router(ifs.clone(), json!([{"destination": "192.168.0.0/16", "nexthop": "10.0.0.9"}, {"destination": "fd10::/48", "nexthop": "fd00::9"}]))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "PENDING");
    assert_eq!(
        r.body["interfaces"][0]["ip_address"], "10.0.0.1",
        "gateway by default"
    );
    let id = r.id();
    // A second router cannot take the same gateway address.
    let r = api
        .post(
            "/api/v1/routers",
            &admin,
            json!({"name": "r2", "vdc_id": vdc, "interfaces": [{"subnet_id": subnet}]}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    // An attached subnet cannot be deleted.
    let path = format!("/api/v1/subnets/{v6}");
    let r = api
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
    // Detaching (PATCH the interface list) frees it; routes must still fit.
    let rpath = format!("/api/v1/routers/{id}");
    let r = api
        .call(
            Method::PATCH,
            &rpath,
            Some(&admin),
            &[("if-match", "\"1\"")],
            Some(json!({"interfaces": [{"subnet_id": subnet}]})),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "routes[1].nexthop");
    let r = api
        .call(
            Method::PATCH,
            &rpath,
            Some(&admin),
            &[("if-match", "\"1\"")],
            Some(json!({"interfaces": [{"subnet_id": subnet}], "routes": []})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["revision"], 2);
    let r = api
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            &[("if-match", "\"1\"")],
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
}

impl Api {
    /// PATCH or DELETE at the revision just read (the If-Match dance).
    async fn change(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Reply {
        let current = self.get(path, token).await;
        assert_eq!(current.status, 200, "GET {path}: {}", current.body);
        let etag = current.etag();
        self.call(
            method,
            path,
            Some(token),
            &[("if-match", etag.as_str())],
            body,
        )
        .await
    }
}

#[tokio::test]
async fn external_networks_router_gateways_and_floating_ips() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    let ext = |body: Value| api.post("/api/v1/external-networks", &admin, body);
    // Bad input: precise errors, nothing stored.
    for (body, field) in [
        (
            json!({"name": "e", "physical_network": "public", "cidr": "2001:db8::/64"}),
            "cidr",
        ),
        (
            json!({"name": "e", "physical_network": "pub lic", "cidr": "198.18.0.0/24"}),
            "physical_network",
        ),
        (
            json!({"name": "e", "physical_network": "public", "cidr": "198.18.0.1/24"}),
            "cidr",
        ),
        (
            json!({"name": "e", "physical_network": "public", "cidr": "198.18.0.0/24",
                "allocation_pools": [{"start": "198.18.0.9", "end": "198.18.0.3"}]}),
            "allocation_pools[0]",
        ),
    ] {
        let r = ext(body).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{}", r.body);
    }
    let r = api
        .post(
            "/api/v1/external-networks",
            &tenant,
            json!({"name": "e", "physical_network": "public", "cidr": "198.18.0.0/24"}),
        )
        .await;
    assert_problem(&r, 403, "forbidden");
    // A pool of three addresses: a gateway, two floating IPs, then none.
    let r = ext(
        json!({"name": "public", "physical_network": "public", "cidr": "198.18.0.0/24",
                      "allocation_pools": [{"start": "198.18.0.10", "end": "198.18.0.12"}]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["gateway_ip"], "198.18.0.1");
    assert_eq!(r.body["status"], "PENDING");
    let net = r.id();
    assert_problem(
        &ext(json!({"name": "public", "physical_network": "x", "cidr": "198.19.0.0/24"})).await,
        409,
        "conflict",
    );
    // Tenants read external networks (to pick one), never change them.
    let r = api
        .get(&format!("/api/v1/external-networks/{net}"), &tenant)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = api.get("/api/v1/external-networks", &tenant).await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1, "{}", r.body);
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/external-networks/{net}"),
            &tenant,
            None,
        )
        .await;
    assert_problem(&r, 403, "forbidden");

    let vpc = api
        .create("/api/v1/vpcs", &tenant, json!({"name": "n"}))
        .await;
    let subnet = api
        .create(
            "/api/v1/subnets",
            &tenant,
            json!({"name": "s", "vpc_id": vpc, "cidr": "10.0.0.0/24"}),
        )
        .await;
    let port = api
        .create(
            "/api/v1/ports",
            &tenant,
            json!({"name": "p", "subnet_id": subnet}),
        )
        .await;
    let port2 = api
        .create(
            "/api/v1/ports",
            &tenant,
            json!({"name": "p2", "subnet_id": subnet}),
        )
        .await;
    // A floating IP: allocated DOWN; associating needs a router between.
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["floating_ip_address"], "198.18.0.10");
    assert_eq!(r.body["status"], "DOWN");
    assert_eq!(r.body["status_reason"], "not associated with a port");
    let fip_path = format!("/api/v1/floating-ips/{}", r.id());
    let r = api
        .change(
            Method::PATCH,
            &fip_path,
            &tenant,
            Some(json!({"port_id": port})),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    assert!(
        r.body["detail"].as_str().unwrap().contains("not reachable"),
        "{}",
        r.body
    );
    let r = api
        .post(
            "/api/v1/routers",
            &tenant,
            json!({"name": "r", "interfaces": [{"subnet_id": subnet}],
                   "external_gateway": {"external_network_id": "nope"}}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "external_gateway.external_network_id");
    let r = api
        .post(
            "/api/v1/routers",
            &tenant,
            json!({"name": "r", "interfaces": [{"subnet_id": subnet}],
                   "external_gateway": {"external_network_id": net, "external_ip": "198.18.0.10"}}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .post(
            "/api/v1/routers",
            &tenant,
            json!({"name": "r", "interfaces": [{"subnet_id": subnet}],
                   "external_gateway": {"external_network_id": net}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["external_gateway"],
        json!({"external_network_id": net, "enable_snat": true, "external_ip": "198.18.0.11"})
    );
    let router_path = format!("/api/v1/routers/{}", r.id());
    let r = api
        .change(
            Method::PATCH,
            &fip_path,
            &tenant,
            Some(json!({"port_id": port})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "PENDING");
    assert_eq!(r.body["fixed_ip_address"], "10.0.0.2");
    // One floating IP per port; the last address; then the pool is empty.
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net, "port_id": port}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net, "port_id": port2}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["floating_ip_address"], "198.18.0.12");
    let fip2_path = format!("/api/v1/floating-ips/{}", r.id());
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("no free address"),
        "{}",
        r.body
    );
    // The path of an association cannot be cut under it.
    for body in [json!({"external_gateway": null}), json!({"interfaces": []})] {
        let r = api
            .change(Method::PATCH, &router_path, &tenant, Some(body))
            .await;
        assert_problem(&r, 409, "conflict");
    }
    let r = api
        .change(Method::DELETE, &router_path, &tenant, None)
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/external-networks/{net}"),
            &admin,
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
    // Deleting a port disassociates its floating IP.
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/ports/{port2}"),
            &tenant,
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api.get(&fip2_path, &tenant).await;
    assert_eq!(r.body["status"], "DOWN", "{}", r.body);
    assert_eq!(r.body["port_id"], Value::Null);
    // Disassociated, the gateway may go; its address is free again.
    let r = api
        .change(
            Method::PATCH,
            &fip_path,
            &tenant,
            Some(json!({"port_id": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "DOWN");
    let r = api
        .change(
            Method::PATCH,
            &router_path,
            &tenant,
            Some(json!({"external_gateway": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["external_gateway"], Value::Null);
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net, "floating_ip_address": "198.18.0.11"}),
        )
        .await;
    assert_eq!(
        r.status, 201,
        "the gateway's address is free again: {}",
        r.body
    );
    for path in [
        fip_path,
        fip2_path,
        format!("/api/v1/floating-ips/{}", r.id()),
    ] {
        let r = api.change(Method::DELETE, &path, &tenant, None).await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/external-networks/{net}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
}

#[tokio::test]
async fn floating_ips_forward_ports_through_one_router() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    let net = api
        .create(
            "/api/v1/external-networks",
            &admin,
            json!({"name": "public", "physical_network": "public", "cidr": "198.18.0.0/24"}),
        )
        .await;
    let vpc = api
        .create("/api/v1/vpcs", &tenant, json!({"name": "n"}))
        .await;
    let subnet = |name: &'static str, cidr: &'static str| {
        let vpc = vpc.clone();
        let api = &api;
        let tenant = tenant.clone();
        async move {
            api.create(
                "/api/v1/subnets",
                &tenant,
                json!({"name": name, "vpc_id": vpc, "cidr": cidr}),
            )
            .await
        }
    };
    let (s1, s2) = (
        subnet("a", "10.0.1.0/24").await,
        subnet("b", "10.0.2.0/24").await,
    );
    let p1 = api
        .create(
            "/api/v1/ports",
            &tenant,
            json!({"name": "p1", "subnet_id": s1}),
        )
        .await;
    let p2 = api
        .create(
            "/api/v1/ports",
            &tenant,
            json!({"name": "p2", "subnet_id": s2}),
        )
        .await;
    let fwd = |port: &str, ext: u16, int: u16| json!({"protocol": "tcp", "external_port": ext, "internal_port_id": port, "internal_port": int});
    // No router between yet: not reachable.
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net, "port_forwardings": [fwd(&p1, 2222, 22)]}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    api.create(
        "/api/v1/routers",
        &tenant,
        json!({"name": "r1", "interfaces": [{"subnet_id": s1}],
               "external_gateway": {"external_network_id": net}}),
    )
    .await;
    api.create(
        "/api/v1/routers",
        &tenant,
        json!({"name": "r2", "interfaces": [{"subnet_id": s2}],
               "external_gateway": {"external_network_id": net}}),
    )
    .await;
    for (body, field) in [
        (
            json!({"external_network_id": net, "port_id": p1, "port_forwardings": [fwd(&p2, 80, 80)]}),
            "port_forwardings",
        ),
        (
            json!({"external_network_id": net, "port_forwardings": [fwd(&p1, 80, 80), fwd(&p1, 80, 81)]}),
            "port_forwardings[1].external_port",
        ),
        (
            json!({"external_network_id": net, "port_forwardings": [fwd(&p1, 0, 80)]}),
            "port_forwardings[0].external_port",
        ),
        (
            json!({"external_network_id": net, "port_forwardings": [fwd(&p1, 80, 80), fwd(&p2, 81, 80)]}),
            "port_forwardings[1].internal_port_id",
        ),
    ] {
        let r = api.post("/api/v1/floating-ips", &tenant, body).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{}", r.body);
    }
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net,
                   "port_forwardings": [fwd(&p1, 2222, 22), {"protocol": "udp", "external_port": 2222,
                                        "internal_port_id": p1, "internal_port": 53}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "PENDING");
    assert_eq!(
        r.body["port_forwardings"][0]["internal_ip_address"],
        "10.0.1.2"
    );
    let fip = r.id();
    let path = format!("/api/v1/floating-ips/{fip}");
    // Forwarding and 1:1 exclude each other.
    let r = api
        .change(Method::PATCH, &path, &tenant, Some(json!({"port_id": p2})))
        .await;
    assert_problem(&r, 422, "invalid-field");
    // Deleting the internal port drops its forwardings: DOWN again.
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/ports/{p1}"),
            &tenant,
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api.get(&path, &tenant).await;
    assert_eq!(r.body["status"], "DOWN", "{}", r.body);
    assert_eq!(r.body["port_forwardings"], json!([]));
    assert_eq!(r.body["router_id"], Value::Null);
    let r = api
        .change(
            Method::PATCH,
            &path,
            &tenant,
            Some(json!({"port_forwardings": [fwd(&p2, 8080, 80)]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "PENDING");
    assert_eq!(
        r.body["port_forwardings"][0]["internal_ip_address"],
        "10.0.2.2"
    );
}

#[tokio::test]
async fn router_firewall_rules_and_policies_are_checked_like_the_data_plane() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    let vpc = api
        .create("/api/v1/vpcs", &tenant, json!({"name": "n"}))
        .await;
    let s1 = api
        .create(
            "/api/v1/subnets",
            &tenant,
            json!({"name": "a", "vpc_id": vpc, "cidr": "10.0.1.0/24"}),
        )
        .await;
    let s2 = api
        .create(
            "/api/v1/subnets",
            &tenant,
            json!({"name": "b", "vpc_id": vpc, "cidr": "10.0.2.0/24"}),
        )
        .await;
    let router = |extra: Value| {
        let mut body = json!({"name": "r", "interfaces": [{"subnet_id": s1}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (extra, field) in [
        (
            json!({"firewall_rules": [{"src_cidr": "10.0.0.1/8", "action": "deny"}]}),
            "firewall_rules[0].src_cidr",
        ),
        (
            json!({"firewall_rules": [{"dst_cidr": "fd00::/8", "action": "deny"}]}),
            "firewall_rules[0].dst_cidr",
        ),
        (
            json!({"firewall_rules": [{"port_range_min": 22, "port_range_max": 22, "action": "deny"}]}),
            "firewall_rules[0].port_range_min",
        ),
        (
            json!({"firewall_rules": [{"protocol": "tcp", "port_range_min": 22, "action": "deny"}]}),
            "firewall_rules[0].port_range_max",
        ),
        (
            json!({"policies": [{"action": "reroute"}]}),
            "policies[0].nexthop",
        ),
        (
            json!({"policies": [{"action": "drop", "nexthop": "10.0.1.9"}]}),
            "policies[0].nexthop",
        ),
        (
            json!({"policies": [{"action": "reroute", "nexthop": "10.0.2.9"}]}),
            "policies[0].nexthop",
        ),
        (
            json!({"policies": [{"action": "drop", "from_subnet_id": s2}]}),
            "policies[0].from_subnet_id",
        ),
        (
            json!({"policies": [{"action": "drop", "protocol": "sctp"}]}),
            "policies[0].protocol",
        ),
        (
            json!({"policies": [{"action": "drop"}, {"action": "allow", "protocol": "any"}]}),
            "policies[1]",
        ),
    ] {
        let r = api
            .post("/api/v1/routers", &tenant, router(extra.clone()))
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{extra}: {}", r.body);
    }
    let r = api
        .post(
            "/api/v1/routers",
            &tenant,
            router(json!({
                "firewall_rules": [{"protocol": "tcp", "port_range_min": 22, "port_range_max": 22,
                                    "src_cidr": "0.0.0.0/0", "action": "deny", "priority": 10}],
                "policies": [{"from_subnet_id": s1, "dst_cidr": "0.0.0.0/0", "protocol": "tcp",
                              "action": "reroute", "nexthop": "10.0.1.9", "priority": 5},
                             {"protocol": "47", "action": "drop"}]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["firewall_rules"][0]["action"], "deny");
    assert_eq!(r.body["policies"][0]["nexthop"], "10.0.1.9");
    // Detaching the subnet a policy names (or reroutes into) is refused.
    let path = format!("/api/v1/routers/{}", r.id());
    let r = api
        .change(
            Method::PATCH,
            &path,
            &tenant,
            Some(json!({"interfaces": [{"subnet_id": s2}]})),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    let r = api
        .change(
            Method::PATCH,
            &path,
            &tenant,
            Some(json!({"policies": [], "firewall_rules": []})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["policies"], json!([]));
}

#[tokio::test]
async fn mirror_sessions_copy_ports_of_their_vdc() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    let mut ports = Vec::new();
    for (v, name) in [(&vdc, "a"), (&vdc, "b"), (&other, "c")] {
        let vpc = api
            .create("/api/v1/vpcs", &admin, json!({"name": name, "vdc_id": v}))
            .await;
        let subnet = api
            .create(
                "/api/v1/subnets",
                &admin,
                json!({"name": name, "vpc_id": vpc, "cidr": "10.0.0.0/24"}),
            )
            .await;
        ports.push(
            api.create(
                "/api/v1/ports",
                &admin,
                json!({"name": name, "subnet_id": subnet}),
            )
            .await,
        );
    }
    let (a, b, foreign) = (&ports[0], &ports[1], &ports[2]);
    for (body, field) in [
        (
            json!({"source_port_ids": [], "target_port_id": b}),
            "source_port_ids",
        ),
        (
            json!({"source_port_ids": [foreign], "target_port_id": b}),
            "source_port_ids[0]",
        ),
        (
            json!({"source_port_ids": [a], "target_port_id": a}),
            "target_port_id",
        ),
        (
            json!({"source_port_ids": [a, a], "target_port_id": b}),
            "source_port_ids[1]",
        ),
        (
            json!({"source_port_ids": [a], "target_port_id": b, "filter": {"cidr": "10.0.0.1/8"}}),
            "filter.cidr",
        ),
        (
            json!({"source_port_ids": [a], "target_port_id": b, "filter": {"protocol": "sctp"}}),
            "filter.protocol",
        ),
    ] {
        let mut body = body;
        body["name"] = json!("m");
        let r = api
            .post("/api/v1/mirror-sessions", &tenant, body.clone())
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{body}: {}", r.body);
    }
    let r = api
        .post(
            "/api/v1/mirror-sessions",
            &tenant,
            json!({"name": "m", "source_port_ids": [a], "direction": "out",
                   "filter": {"protocol": "tcp", "cidr": "10.0.0.0/24"}, "target_port_id": b}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "PENDING");
    let path = format!("/api/v1/mirror-sessions/{}", r.id());
    // Ports in a session stay until the session goes.
    let r = api
        .change(Method::DELETE, &format!("/api/v1/ports/{b}"), &tenant, None)
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .change(
            Method::PATCH,
            &path,
            &tenant,
            Some(json!({"direction": "both", "filter": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["filter"], Value::Null);
    let r = api.change(Method::DELETE, &path, &tenant, None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api
        .change(Method::DELETE, &format!("/api/v1/ports/{b}"), &tenant, None)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
}

#[tokio::test]
async fn qos_policies_limit_ports_and_floating_ips() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    for (body, field) in [
        (json!({"name": "q"}), "ingress"),
        (
            json!({"name": "q", "ingress": {"max_kbps": 0}}),
            "ingress.max_kbps",
        ),
        (
            json!({"name": "q", "egress": {"max_kbps": 1000, "max_burst_kbits": 1}}),
            "egress.max_burst_kbits",
        ),
        (json!({"name": "q", "dscp_mark": 64}), "dscp_mark"),
    ] {
        let r = api.post("/api/v1/qos-policies", &tenant, body).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{}", r.body);
    }
    let r = api
        .post(
            "/api/v1/qos-policies",
            &tenant,
            json!({"name": "bw", "ingress": {"max_kbps": 1000}, "egress": {"max_kbps": 2000, "max_burst_kbits": 500}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["ingress"]["max_burst_kbits"], 800,
        "80 % of a second by default"
    );
    assert_eq!(r.body["egress"]["max_burst_kbits"], 500);
    let bw = r.id();
    let mark = api
        .create(
            "/api/v1/qos-policies",
            &tenant,
            json!({"name": "ef", "dscp_mark": 46}),
        )
        .await;
    let net = api
        .create(
            "/api/v1/external-networks",
            &admin,
            json!({"name": "public", "physical_network": "public", "cidr": "198.18.0.0/24"}),
        )
        .await;
    let vpc = api
        .create("/api/v1/vpcs", &tenant, json!({"name": "n"}))
        .await;
    let subnet = api
        .create(
            "/api/v1/subnets",
            &tenant,
            json!({"name": "s", "vpc_id": vpc, "cidr": "10.0.0.0/24"}),
        )
        .await;
    let r = api
        .post(
            "/api/v1/ports",
            &tenant,
            json!({"name": "p", "subnet_id": subnet, "qos_policy_id": "nope"}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "qos_policy_id");
    let port = api
        .create(
            "/api/v1/ports",
            &tenant,
            json!({"name": "p", "subnet_id": subnet, "qos_policy_id": mark}),
        )
        .await;
    let port_path = format!("/api/v1/ports/{port}");
    let r = api
        .change(
            Method::PATCH,
            &port_path,
            &tenant,
            Some(json!({"qos_policy_id": bw})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["qos_policy_id"], bw.as_str());
    // Floating IPs take bandwidth limits only.
    let r = api
        .post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net, "qos_policy_id": mark}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    let fip = api
        .create(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net, "qos_policy_id": bw}),
        )
        .await;
    let bw_path = format!("/api/v1/qos-policies/{bw}");
    let r = api
        .change(
            Method::PATCH,
            &bw_path,
            &tenant,
            Some(json!({"dscp_mark": 10})),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .change(
            Method::PATCH,
            &bw_path,
            &tenant,
            Some(json!({"ingress": null, "egress": {"max_kbps": 3000}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["ingress"], Value::Null);
    assert_eq!(r.body["egress"]["max_burst_kbits"], 2400);
    // In use: not deleted; free again once nothing refers to it.
    assert_problem(
        &api.change(Method::DELETE, &bw_path, &tenant, None).await,
        409,
        "conflict",
    );
    let fip_path = format!("/api/v1/floating-ips/{fip}");
    for path in [&port_path, &fip_path] {
        let r = api
            .change(
                Method::PATCH,
                path,
                &tenant,
                Some(json!({"qos_policy_id": null})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = api.change(Method::DELETE, &bw_path, &tenant, None).await;
    assert_eq!(r.status, 204, "{}", r.body);
}

impl Api {
    /// Plays the host agent: a task finished and its resource reached `status`.
    async fn agent_did(&self, task: &Value, status: &str) {
        let mut tx = self.state.store.begin_write().await.unwrap();
        super::tasks::set_state(&mut tx, task["id"].as_str().unwrap(), "SUCCEEDED", 100, "")
            .await
            .unwrap();
        let kind = task["resource_type"].as_str().unwrap();
        let id = task["resource_id"].as_str().unwrap();
        super::records::observe(&mut tx, kind, id, status, None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    async fn set_status(&self, kind: &str, id: &str, status: &str) {
        let mut tx = self.state.store.begin_write().await.unwrap();
        super::records::observe(&mut tx, kind, id, status, None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

#[tokio::test]
async fn volumes_attach_detach_and_grow_only_when_safe() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    api.host("h1").await;
    let mut volumes = Vec::new();
    for name in ["boot", "data", "spare"] {
        let r = api
            .post(
                "/api/v1/volumes",
                &admin,
                json!({"name": name, "vdc_id": vdc, "size_gib": 1}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        api.agent_did(&r.body, "AVAILABLE").await;
        volumes.push(r.body["resource_id"].as_str().unwrap().to_owned());
    }
    let (boot, data, spare) = (&volumes[0], &volumes[1], &volumes[2]);
    let r = api
        .post(
            "/api/v1/vms",
            &admin,
            json!({"name": "vm", "vdc_id": vdc, "vcpus": 1, "memory_mib": 128,
                   "volume_ids": [boot], "start": false}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.body["resource_id"].as_str().unwrap().to_owned();
    let attach = format!("/api/v1/vms/{vm}/volumes");

    // The VM is still CREATING: nothing may change its disks.
    let r = api.post(&attach, &admin, json!({"volume_id": data})).await;
    assert_problem(&r, 409, "conflict");
    api.agent_did(&queued_task(&api, &admin, &vm).await, "STOPPED")
        .await;
    api.set_status("volume", boot, "IN_USE").await;

    let r = api
        .post(&attach, &admin, json!({"volume_id": "nope"}))
        .await;
    assert_problem(&r, 422, "invalid-field");
    let r = api.post(&attach, &admin, json!({"volume_id": boot})).await;
    assert_problem(&r, 409, "conflict");
    let r = api.post(&attach, &admin, json!({"volume_id": data})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["action"], "attach-volume");
    let v = api.get(&format!("/api/v1/volumes/{data}"), &admin).await;
    assert_eq!(v.body["status"], "ATTACHING");
    assert_eq!(v.body["attached_to"], vm.as_str());
    // Reserved: neither another attach nor a resize nor a delete takes it.
    let r = api.post(&attach, &admin, json!({"volume_id": spare})).await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .post(
            &format!("/api/v1/volumes/{data}/actions/resize"),
            &admin,
            json!({"size_gib": 2}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    api.agent_did(&queued_task(&api, &admin, &vm).await, "STOPPED")
        .await;

    // Detach: only the VM's own disks, never the boot disk of a running VM.
    let r = api
        .call(
            Method::DELETE,
            &format!("{attach}/{spare}"),
            Some(&admin),
            &[],
            None,
        )
        .await;
    assert_problem(&r, 404, "not-found");
    api.set_status("vm", &vm, "RUNNING").await;
    let r = api
        .call(
            Method::DELETE,
            &format!("{attach}/{boot}"),
            Some(&admin),
            &[],
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
    assert!(r.body["detail"].as_str().unwrap().contains("boot disk"));

    // Grow: never shrink, never under a running VM.
    let resize = |id: &str| format!("/api/v1/volumes/{id}/actions/resize");
    let r = api
        .post(&resize(boot), &admin, json!({"size_gib": 2}))
        .await;
    assert_problem(&r, 409, "conflict");
    assert!(r.body["detail"].as_str().unwrap().contains("stop it first"));
    let r = api
        .post(&resize(spare), &admin, json!({"size_gib": 1}))
        .await;
    assert_problem(&r, 422, "invalid-field");
    let r = api
        .post(&resize(spare), &admin, json!({"size_gib": 99999}))
        .await;
    assert_problem(&r, 422, "invalid-field");
    let r = api
        .post(&resize(spare), &admin, json!({"size_gib": 2}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["params"]["size_bytes"], 2u64 << 30);

    // Backups: the agent cuts a volume of a RUNNING or PAUSED VM at a point
    // in time (and a STOPPED VM's as before); a VM in another state, and
    // work pending on the volume, are refused.
    let backup = format!("/api/v1/volumes/{boot}/backups");
    api.set_status("vm", &vm, "ERROR").await;
    let r = api.post(&backup, &admin, json!({"name": "b"})).await;
    assert_problem(&r, 409, "conflict");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("STOPPED, RUNNING or PAUSED"),
        "{}",
        r.body
    );
    for status in ["RUNNING", "PAUSED", "STOPPED"] {
        api.set_status("vm", &vm, status).await;
        let r = api.post(&backup, &admin, json!({"name": "b"})).await;
        assert_eq!(r.status, 202, "VM {status}: {}", r.body);
        assert_eq!(r.body["action"], "backup");
        let again = api.post(&backup, &admin, json!({"name": "b2"})).await;
        assert_problem(&again, 409, "conflict");
        assert!(
            again.body["detail"].as_str().unwrap().contains("task"),
            "{}",
            again.body
        );
        api.agent_did(&r.body, "IN_USE").await;
    }
}

/// The VM's task that is still queued.
async fn queued_task(api: &Api, token: &str, vm: &str) -> Value {
    let r = api
        .get(&format!("/api/v1/tasks?resource_id={vm}"), token)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["state"] == "QUEUED")
        .cloned()
        .unwrap_or_else(|| panic!("no queued task for {vm}: {}", r.body))
}

#[tokio::test]
async fn qcow2_volumes_are_checked_and_kept_from_raw_only_features() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let create = |body: Value| {
        let mut b = json!({"name": "v", "vdc_id": vdc, "size_gib": 1});
        for (k, v) in body.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, field) in [
        (json!({"format": "vmdk"}), "format"),
        (json!({"cluster_size_kib": 128}), "cluster_size_kib"),
        (
            json!({"format": "qcow2", "cluster_size_kib": 96}),
            "cluster_size_kib",
        ),
        (
            json!({"format": "qcow2", "cluster_size_kib": 4096}),
            "cluster_size_kib",
        ),
        (
            json!({"format": "qcow2", "cluster_size_kib": 32}),
            "cluster_size_kib",
        ),
        (
            json!({"format": "qcow2", "provisioning": "thick"}),
            "provisioning",
        ),
    ] {
        let r = api
            .post("/api/v1/volumes", &admin, create(body.clone()))
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{body}: {}", r.body);
    }
    let r = api
        .post(
            "/api/v1/volumes",
            &admin,
            create(json!({"format": "qcow2", "cluster_size_kib": 256})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    api.agent_did(&r.body, "AVAILABLE").await;
    let q = r.body["resource_id"].as_str().unwrap().to_owned();
    let v = api.get(&format!("/api/v1/volumes/{q}"), &admin).await;
    assert_eq!(v.body["format"], "qcow2");
    assert_eq!(v.body["cluster_size"], 256 << 10);
    let r = api.post("/api/v1/volumes", &admin, create(json!({}))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let raw = r.body["resource_id"].as_str().unwrap().to_owned();
    let v = api.get(&format!("/api/v1/volumes/{raw}"), &admin).await;
    assert_eq!(v.body["format"], "raw");
    assert!(v.body.get("cluster_size").is_none(), "{}", v.body);

    // Backups read the file as the disk: refused, with the reason.
    let r = api
        .post(
            &format!("/api/v1/volumes/{q}/backups"),
            &admin,
            json!({"name": "b"}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("raw volumes only"),
        "{}",
        r.body
    );
    // A copy keeps the format.
    let r = api
        .post(
            &format!("/api/v1/volumes/{q}/actions/copy"),
            &admin,
            json!({"name": "c"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let c = r.body["resource_id"].as_str().unwrap();
    let v = api.get(&format!("/api/v1/volumes/{c}"), &admin).await;
    assert_eq!(v.body["format"], "qcow2");
    assert_eq!(v.body["cluster_size"], 256 << 10);

    // A VM on it: snapshots, clones and VM backups copy or read its disks
    // as raw files, so they are refused too.
    api.host("h1").await;
    let r = api
        .post(
            "/api/v1/vms",
            &admin,
            json!({"name": "vm", "vdc_id": vdc, "vcpus": 1, "memory_mib": 128,
                   "volume_ids": [q], "start": false}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.body["resource_id"].as_str().unwrap().to_owned();
    api.agent_did(&queued_task(&api, &admin, &vm).await, "STOPPED")
        .await;
    api.set_status("volume", &q, "IN_USE").await;
    for (path, body) in [
        ("snapshots", json!({"name": "s"})),
        ("clone", json!({"name": "c"})),
        ("backups", json!({"name": "b"})),
    ] {
        let r = api
            .post(&format!("/api/v1/vms/{vm}/{path}"), &admin, body)
            .await;
        assert_problem(&r, 409, "conflict");
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("raw volumes only"),
            "{path}: {}",
            r.body
        );
    }
}

#[tokio::test]
async fn volume_and_compute_quotas_are_enforced() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api
        .vdc(
            &admin,
            "small",
            json!({"volumes": 2, "volume_gb": 3, "vcpus": 2, "memory_mib": 512}),
        )
        .await;
    let volume = |size: u64| json!({"name": "v", "vdc_id": vdc, "size_gib": size});
    let r = api.post("/api/v1/volumes", &admin, volume(4)).await;
    assert_problem(&r, 409, "quota-exceeded");
    assert_eq!(r.body["field"], "quota.volume_gb");
    let first = api.post("/api/v1/volumes", &admin, volume(2)).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let r = api.post("/api/v1/volumes", &admin, volume(2)).await;
    assert_problem(&r, 409, "quota-exceeded");
    assert_eq!(r.body["field"], "quota.volume_gb");
    let second = api.post("/api/v1/volumes", &admin, volume(1)).await;
    assert_eq!(second.status, 202, "{}", second.body);
    let r = api.post("/api/v1/volumes", &admin, volume(1)).await;
    assert_problem(&r, 409, "quota-exceeded");
    assert_eq!(r.body["field"], "quota.volumes");

    let vm = |vcpus: u32, memory: u32| {
        json!({"name": "vm", "vdc_id": vdc, "vcpus": vcpus, "memory_mib": memory,
               "volume_ids": [first.body["resource_id"]], "start": false})
    };
    let r = api.post("/api/v1/vms", &admin, vm(3, 128)).await;
    assert_problem(&r, 409, "quota-exceeded");
    assert_eq!(r.body["field"], "quota.vcpus");
    let r = api.post("/api/v1/vms", &admin, vm(1, 1024)).await;
    assert_problem(&r, 409, "quota-exceeded");
    assert_eq!(r.body["field"], "quota.memory_mib");
}

#[tokio::test]
async fn tasks_are_claimed_per_host_and_taken_over_only_from_silent_agents() {
    use super::{hosts, records, tasks};
    let api = Api::new().await;
    let store = &api.state.store;
    let mut tx = store.begin_write().await.unwrap();
    let vm = records::insert(
        &mut tx,
        records::NewRecord {
            kind: super::vms::KIND,
            vdc_id: None,
            parent_id: None,
            name: "placed",
            spec: json!({"host_id": "c"}),
            status: "STOPPED",
        },
    )
    .await
    .unwrap();
    let mut queue = Vec::new();
    for (kind, id, action) in [
        ("volume", "r1", "create"),
        ("volume", "r1", "resize"),
        ("volume", "r2", "create"),
        (super::vms::KIND, vm.meta.id.as_str(), "start"),
    ] {
        queue.push(
            tasks::enqueue(&mut tx, None, kind, id, action, json!({}))
                .await
                .unwrap(),
        );
    }
    for host in ["a", "b", "c"] {
        hosts::heartbeat(&mut tx, host).await.unwrap();
    }
    tx.commit().await.unwrap();
    let (r1_create, r1_resize, r2_create, vm_start) = (
        queue[0].id.clone(),
        queue[1].id.clone(),
        queue[2].id.clone(),
        queue[3].id.clone(),
    );
    assert_eq!(
        queue[3].host_id.as_deref(),
        Some("c"),
        "a VM's task runs on its host"
    );
    assert_eq!(queue[0].host_id, None);

    let claim = |host: &'static str| async move {
        let mut tx = store.begin_write().await.unwrap();
        let task = tasks::claim_next(&mut tx, host).await.unwrap();
        tx.commit().await.unwrap();
        task.map(|t| t.id)
    };
    let finish = |id: String| async move {
        let mut tx = store.begin_write().await.unwrap();
        tasks::set_state(&mut tx, &id, tasks::SUCCEEDED, 100, "")
            .await
            .unwrap();
        tx.commit().await.unwrap();
    };
    assert_eq!(claim("a").await, Some(r1_create.clone()));
    // r1's next task waits for its first; b takes other work.
    assert_eq!(claim("b").await, Some(r2_create.clone()));
    finish(r2_create).await;
    assert_eq!(claim("b").await, None, "a is alive: its task stays with it");
    sqlx::query("UPDATE heartbeats SET at = 0 WHERE host_id = 'a'")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(
        claim("b").await,
        Some(r1_create.clone()),
        "a went silent: b takes its running task over"
    );
    finish(r1_create).await;
    assert_eq!(claim("b").await, Some(r1_resize.clone()));
    finish(r1_resize).await;
    assert_eq!(claim("b").await, None, "the VM's task is for host c");
    assert_eq!(claim("c").await, Some(vm_start));
}

#[tokio::test]
async fn custom_roles_grant_exactly_their_permissions() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let own = api.vdc(&admin, "own", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let other_vpc = api
        .create(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "theirs", "vdc_id": other}),
        )
        .await;

    // Nothing beyond a VDC admin's ceiling, each family once, precise fields.
    for (permissions, field) in [
        (
            json!([{"family": "vdc", "actions": ["create"]}]),
            "permissions[0].actions[0]",
        ),
        (
            json!([{"family": "network", "actions": []}]),
            "permissions[0].actions",
        ),
        (
            json!([{"family": "network", "actions": ["read"]}, {"family": "network", "actions": ["create"]}]),
            "permissions[1].family",
        ),
    ] {
        let r = api
            .post(
                "/api/v1/roles",
                &admin,
                json!({"name": "bad", "permissions": permissions}),
            )
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{}", r.body);
    }
    let r = api
        .post(
            "/api/v1/roles",
            &admin,
            json!({"name": "bad", "permissions": [{"family": "host", "actions": ["read"]}]}),
        )
        .await;
    assert_problem(&r, 400, "bad-json");
    assert!(
        r.body["detail"].as_str().unwrap().contains("host"),
        "{}",
        r.body
    );
    assert_eq!(api.count("resources WHERE kind = 'role'").await, 0);

    let role = api
        .post(
            "/api/v1/roles",
            &admin,
            json!({"name": "net-operator", "description": "networks only",
                   "permissions": [{"family": "network", "actions": ["read", "create", "update", "delete"]},
                                   {"family": "token", "actions": ["read", "create", "delete"]}]}),
        )
        .await;
    assert_eq!(role.status, 201, "{}", role.body);
    let role_id = role.id();

    // role_id goes with role custom only, and must exist.
    for (body, field) in [
        (
            json!({"name": "x1", "password": PW, "role": "custom", "vdc_id": own}),
            "role_id",
        ),
        (
            json!({"name": "x2", "password": PW, "role": "vdc-user", "vdc_id": own, "role_id": role_id}),
            "role_id",
        ),
        (
            json!({"name": "x3", "password": PW, "role": "custom", "vdc_id": own, "role_id": "nope"}),
            "role_id",
        ),
    ] {
        let r = api.post("/api/v1/users", &admin, body).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{}", r.body);
    }
    let r = api
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "netop", "password": PW, "role": "custom", "role_id": role_id, "vdc_id": own}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["role"], "custom");
    assert_eq!(r.body["role_id"], role_id.as_str());
    let netop = api.token("netop", PW).await;

    // Granted: networks in its own VDC. Not granted: compute, users, roles.
    let vpc = api
        .post(
            "/api/v1/vpcs",
            &netop,
            json!({"name": "mine", "vdc_id": own}),
        )
        .await;
    assert_eq!(vpc.status, 201, "{}", vpc.body);
    let r = api
        .post(
            "/api/v1/volumes",
            &netop,
            json!({"name": "v", "vdc_id": own, "size_gib": 1}),
        )
        .await;
    assert_problem(&r, 403, "forbidden");
    assert_problem(&api.get("/api/v1/users", &netop).await, 403, "forbidden");
    assert_problem(&api.get("/api/v1/roles", &netop).await, 403, "forbidden");
    // Another VDC stays invisible.
    assert_problem(
        &api.get(&format!("/api/v1/vpcs/{other_vpc}"), &netop).await,
        404,
        "not-found",
    );

    // A narrower role applies at the holder's next request.
    let r = api
        .call(
            Method::PATCH,
            &format!("/api/v1/roles/{role_id}"),
            Some(&admin),
            &[("if-match", &role.etag())],
            Some(json!({"permissions": [{"family": "network", "actions": ["read"]}]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = api
        .post(
            "/api/v1/vpcs",
            &netop,
            json!({"name": "more", "vdc_id": own}),
        )
        .await;
    assert_problem(&r, 403, "forbidden");
    assert_eq!(
        api.get(&format!("/api/v1/vpcs/{}", vpc.id()), &netop)
            .await
            .status,
        200
    );

    // A held role cannot be deleted.
    let current = api.get(&format!("/api/v1/roles/{role_id}"), &admin).await;
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/roles/{role_id}"),
            Some(&admin),
            &[("if-match", &current.etag())],
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
}

#[tokio::test]
async fn admins_reset_a_lost_second_factor() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let peer = api.user(&admin, "peer-user", "vdc-user", &vdc).await;
    api.user(&admin, "lost-phone", "vdc-user", &vdc).await;
    sqlx::query("UPDATE users SET totp_secret = 'JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP' WHERE name = 'lost-phone'")
        .execute(api.state.store.pool())
        .await
        .unwrap();
    assert_problem(&api.login("lost-phone", PW).await, 401, "totp-required");
    let users = api.get("/api/v1/users?q=lost", &admin).await;
    let user = &users.body["items"][0];
    assert_eq!(user["totp_enabled"], true, "{user}");
    let path = format!("/api/v1/users/{}", user["id"].as_str().unwrap());
    let etag = format!("\"{}\"", user["revision"]);
    let reset = |token: String| {
        let (path, etag) = (path.clone(), etag.clone());
        let api = &api;
        async move {
            api.call(
                Method::PATCH,
                &path,
                Some(&token),
                &[("if-match", &etag)],
                Some(json!({"reset_totp": true})),
            )
            .await
        }
    };
    assert_problem(&reset(peer).await, 403, "forbidden");
    let r = reset(admin).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["totp_enabled"], false);
    assert_eq!(api.login("lost-phone", PW).await.status, 200);
}

#[tokio::test]
async fn access_rules_admit_by_client_address_and_never_lock_out_their_author() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let tenant = api.user(&admin, "tenant-admin", "vdc-admin", &vdc).await;
    let from = |ip: &'static str, method: Method, path: &str, body: Option<Value>| {
        let admin = admin.clone();
        let path = path.to_owned();
        let api = &api;
        async move {
            api.call_from(Some(ip), method, &path, Some(&admin), &[], body)
                .await
        }
    };
    let rule = |name: &str, cidr: &str, action: &str| json!({"name": name, "cidr": cidr, "action": action});
    for (cidr, why) in [
        ("10.0.0.1/8", "host bits"),
        ("10.0.0.0/33", "not an address"),
    ] {
        let r = from(
            "10.1.1.1",
            Method::POST,
            "/api/v1/access-rules",
            Some(rule("bad", cidr, "allow")),
        )
        .await;
        assert_problem(&r, 422, "invalid-field");
        assert!(
            r.body["detail"].as_str().unwrap().contains(why),
            "{}",
            r.body
        );
    }
    // An allow list that leaves out its author is refused.
    let r = from(
        "192.0.2.9",
        Method::POST,
        "/api/v1/access-rules",
        Some(rule("lan", "10.0.0.0/8", "allow")),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    let r = from(
        "10.1.1.1",
        Method::POST,
        "/api/v1/access-rules",
        Some(rule("lan", "10.0.0.0/8", "allow")),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Outside the allow list: refused before authentication, login included.
    let r = from("192.0.2.9", Method::GET, "/api/v1/vdcs", None).await;
    assert_problem(&r, 403, "address-denied");
    let r = api
        .call_from(
            Some("192.0.2.9"),
            Method::POST,
            "/api/v1/auth/login",
            None,
            &[],
            Some(json!({"username": "admin", "password": ADMIN_PW})),
        )
        .await;
    assert_problem(&r, 403, "address-denied");
    assert_eq!(
        from("10.9.9.9", Method::GET, "/api/v1/vdcs", None)
            .await
            .status,
        200
    );
    assert_eq!(
        from("::ffff:10.9.9.9", Method::GET, "/api/v1/vdcs", None)
            .await
            .status,
        200
    );
    // Deny wins over allow; denying the author's own address is refused.
    let r = from(
        "10.1.1.1",
        Method::POST,
        "/api/v1/access-rules",
        Some(rule("lab", "10.2.0.0/16", "deny")),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_problem(
        &from("10.2.3.4", Method::GET, "/api/v1/vdcs", None).await,
        403,
        "address-denied",
    );
    let r = from(
        "10.1.1.1",
        Method::POST,
        "/api/v1/access-rules",
        Some(rule("me", "10.1.1.1", "deny")),
    )
    .await;
    assert_problem(&r, 409, "conflict");
    assert_eq!(api.count("resources WHERE kind = 'access_rule'").await, 2);
    // Health checks are not API requests.
    assert_eq!(
        api.call_from(Some("192.0.2.9"), Method::GET, "/healthz", None, &[], None)
            .await
            .status,
        200
    );
    // Only system admins manage the rules.
    let r = api
        .call_from(
            Some("10.1.1.1"),
            Method::GET,
            "/api/v1/access-rules",
            Some(&tenant),
            &[],
            None,
        )
        .await;
    assert_problem(&r, 403, "forbidden");
}

#[tokio::test]
async fn docs_page_renders_every_operation_and_schema() {
    let api = Api::new().await;
    let response = api
        .app
        .clone()
        .oneshot(Request::get("/api/v1/docs").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let page = String::from_utf8(bytes.to_vec()).unwrap();
    let spec = super::openapi();
    let spec = serde_json::to_value(&spec).unwrap();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let heading = format!(
                "<span class=m>{}</span> {}</h3>",
                method.to_uppercase(),
                path.replace('&', "&amp;")
            );
            assert!(page.contains(&heading), "{heading} missing");
        }
    }
    for schema in spec["components"]["schemas"].as_object().unwrap().keys() {
        assert!(
            page.contains(&format!("id=\"schema-{schema}\"")),
            "{schema}"
        );
    }
}

#[tokio::test]
async fn backup_policies_run_on_schedule_and_keep_their_retention() {
    use super::backup_policies::run_due;
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let volume = |vdc: String| {
        let api = &api;
        let admin = admin.clone();
        async move {
            let r = api
                .post(
                    "/api/v1/volumes",
                    &admin,
                    json!({"name": "v", "vdc_id": vdc, "size_gib": 1}),
                )
                .await;
            assert_eq!(r.status, 202, "{}", r.body);
            api.agent_did(&r.body, "AVAILABLE").await;
            r.body["resource_id"].as_str().unwrap().to_owned()
        }
    };
    let vol = volume(vdc.clone()).await;
    let theirs = volume(other.clone()).await;
    let policy = |extra: Value| {
        let mut b = json!({"name": "nightly", "vdc_id": vdc, "volume_ids": [vol],
                           "interval_seconds": 3600, "retention": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (extra, field) in [
        (json!({"interval_seconds": 30}), "interval_seconds"),
        (json!({"retention": 0}), "retention"),
        (json!({"volume_ids": []}), "volume_ids"),
        (json!({"volume_ids": [theirs]}), "volume_ids[0]"),
        (json!({"volume_ids": [vol, vol]}), "volume_ids[1]"),
        (json!({"volume_ids": ["nope"]}), "volume_ids[0]"),
    ] {
        let r = api
            .post("/api/v1/backup-policies", &admin, policy(extra.clone()))
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{extra}: {}", r.body);
    }
    let created = api
        .post("/api/v1/backup-policies", &admin, policy(json!({})))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let policy_path = format!("/api/v1/backup-policies/{}", created.id());
    let t0 = created.body["next_run_at"].as_i64().unwrap();

    let store = &api.state.store;
    let run = |now: i64| async move {
        let mut tx = store.begin_write().await.unwrap();
        let n = run_due(&mut tx, now).await.unwrap();
        tx.commit().await.unwrap();
        n
    };
    // What the agent would do with the queued backups.
    let take_queued = || async {
        let queued = api.get("/api/v1/tasks?state=QUEUED", &admin).await;
        for task in queued.body["items"].as_array().unwrap() {
            if task["action"] == "backup" {
                api.agent_did(task, "AVAILABLE").await;
                let backup = task["params"]["backup_id"].as_str().unwrap();
                api.set_status("backup", backup, "AVAILABLE").await;
            }
        }
    };
    const HOUR: i64 = 3_600_000;
    assert_eq!(run(t0).await, 1, "a new policy is due at once");
    take_queued().await;
    assert_eq!(run(t0 + 1000).await, 0, "not due again before its interval");
    for round in 1..=3 {
        assert_eq!(run(t0 + round * HOUR).await, 1);
        take_queued().await;
    }
    let backups = api
        .get(
            &format!("/api/v1/backups?parent_id={vol}&sort=created_at"),
            &admin,
        )
        .await;
    let statuses: Vec<&str> = backups.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    // The last round found three AVAILABLE: the oldest went. The round's
    // own backup is not counted until it is taken (a failed one must not
    // have cost a good one), so two kept + the newest.
    assert_eq!(
        statuses,
        ["DELETING", "AVAILABLE", "AVAILABLE", "AVAILABLE"],
        "{}",
        backups.body
    );
    let p = api.get(&policy_path, &admin).await;
    assert_eq!(p.body["last_run_at"], t0 + 3 * HOUR);
    assert_eq!(p.body["next_run_at"], t0 + 4 * HOUR);
    assert!(
        p.body["last_result"]
            .as_str()
            .unwrap()
            .contains("1 old backup(s) deleted"),
        "{}",
        p.body
    );
    // A volume with work still queued is skipped for the round, and said so.
    let r = api
        .post(
            &format!("/api/v1/volumes/{vol}/backups"),
            &admin,
            json!({"name": "manual"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(run(t0 + 4 * HOUR).await, 1);
    let p = api.get(&policy_path, &admin).await;
    assert!(
        p.body["last_result"].as_str().unwrap().contains("skipped"),
        "{}",
        p.body
    );
}

#[tokio::test]
async fn loadbalancers_on_vpc_subnets_hold_a_vip_port_and_refuse_what_the_data_plane_cannot_do() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let vpc = api
        .create("/api/v1/vpcs", &admin, json!({"name": "n", "vdc_id": vdc}))
        .await;
    let mut subnets = Vec::new();
    for (name, cidr) in [
        ("a", "10.0.1.0/24"),
        ("b", "10.0.2.0/24"),
        ("c", "10.0.3.0/24"),
    ] {
        subnets.push(
            api.create(
                "/api/v1/subnets",
                &admin,
                json!({"name": name, "vpc_id": vpc, "cidr": cidr}),
            )
            .await,
        );
    }
    let foreign_vpc = api
        .create(
            "/api/v1/vpcs",
            &admin,
            json!({"name": "f", "vdc_id": other}),
        )
        .await;
    let foreign = api
        .create(
            "/api/v1/subnets",
            &admin,
            json!({"name": "f", "vpc_id": foreign_vpc, "cidr": "10.0.1.0/24"}),
        )
        .await;
    let router = api
        .create(
            "/api/v1/routers",
            &admin,
            json!({"name": "r", "vdc_id": vdc,
                   "interfaces": [{"subnet_id": subnets[0]}, {"subnet_id": subnets[1]}]}),
        )
        .await;
    let doc = |subnet: &str, vip: Option<&str>, listener: &str, algorithm: &str, member: &str| {
        let mut d = json!({
            "name": "web", "vdc_id": vdc, "vip_subnet_id": subnet,
            "listeners": [{"id": "l", "protocol": listener, "protocol_port": 80, "default_pool_id": "p"}],
            "pools": [{"id": "p", "protocol": "TCP", "lb_algorithm": algorithm, "members": [
                {"address": member, "protocol_port": 8080},
                {"address": "10.0.2.11", "protocol_port": 8080, "weight": 2}]}]
        });
        if let Some(vip) = vip {
            d["vip_address"] = vip.into();
        }
        d
    };
    let ports_before = api.count("resources WHERE kind = 'port'").await;
    let (a, b, c) = (&subnets[0], &subnets[1], &subnets[2]);
    for (body, status, field, why) in [
        (
            doc(a, None, "HTTP", "SOURCE_IP_PORT", "10.0.2.10"),
            422,
            "load_balancer",
            "HTTP needs a host VIP",
        ),
        (
            doc(a, None, "TCP", "ROUND_ROBIN", "10.0.2.10"),
            422,
            "load_balancer",
            "SOURCE_IP_PORT or SOURCE_IP",
        ),
        (
            doc(a, None, "TCP", "SOURCE_IP_PORT", "10.0.3.5"),
            422,
            "pools[0].members[0].address",
            "no subnet of router",
        ),
        (
            doc(a, Some("10.0.2.100"), "TCP", "SOURCE_IP_PORT", "10.0.2.10"),
            422,
            "vip_address",
            "inside 10.0.1.0/24",
        ),
        (
            doc(&foreign, None, "TCP", "SOURCE_IP_PORT", "10.0.2.10"),
            422,
            "vip_subnet_id",
            "no subnet",
        ),
        (
            doc(c, None, "TCP", "SOURCE_IP_PORT", "10.0.2.10"),
            409,
            "",
            "no router of the VDC",
        ),
    ] {
        let r = api.post("/api/v1/loadbalancers", &admin, body).await;
        assert_eq!(r.status.as_u16(), status, "{}", r.body);
        if status == 422 {
            assert_eq!(r.body["field"], field, "{}", r.body);
        }
        assert!(r.body.to_string().contains(why), "{why}: {}", r.body);
    }
    let r = api
        .post(
            "/api/v1/loadbalancers",
            &admin,
            json!({"name": "x", "vdc_id": vdc, "listeners": [], "pools": []}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "vip_address", "{}", r.body);
    assert_eq!(
        api.count("resources WHERE kind = 'port'").await,
        ports_before,
        "nothing taken by refused load balancers"
    );

    // The VIP's address is held by a port of the subnet owned by the load
    // balancer; the router on the subnet balances it.
    let r = api
        .post(
            "/api/v1/loadbalancers",
            &admin,
            doc(a, Some("10.0.1.100"), "TCP", "SOURCE_IP_PORT", "10.0.2.10"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let lb = r.id();
    assert_eq!(r.body["vip_address"], "10.0.1.100");
    assert_eq!(r.body["vip_subnet_id"], a.as_str());
    assert_eq!(r.body["router_id"], router.as_str());
    let vip_port = r.body["vip_port_id"].as_str().unwrap().to_owned();
    let port = api.get(&format!("/api/v1/ports/{vip_port}"), &admin).await;
    assert_eq!(port.body["fixed_ip"], "10.0.1.100", "{}", port.body);
    assert_eq!(port.body["device_id"], lb.as_str(), "{}", port.body);
    let r = api
        .post(
            "/api/v1/loadbalancers",
            &admin,
            doc(a, Some("10.0.1.100"), "TCP", "SOURCE_IP", "10.0.2.10"),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    // Another VIP on the subnet comes from its pools; UDP on the same port
    // is fine.
    let mut udp = doc(a, None, "UDP", "SOURCE_IP", "10.0.2.10");
    udp["pools"][0]["protocol"] = "UDP".into();
    let r = api.post("/api/v1/loadbalancers", &admin, udp).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_ne!(r.body["vip_address"], "10.0.1.100");
    let udp_lb = r.id();

    // What holds the VIP cannot go from under it.
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/ports/{vip_port}"),
            &admin,
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .change(
            Method::PATCH,
            &format!("/api/v1/routers/{router}"),
            &admin,
            Some(json!({"interfaces": [{"subnet_id": b}]})),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    assert!(
        r.body.to_string().contains(&lb) || r.body.to_string().contains(&udp_lb),
        "{}",
        r.body
    );
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/routers/{router}"),
            &admin,
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");

    // A floating IP on the VIP, through the router that balances it; it is
    // released with the load balancer.
    let net = api
        .create(
            "/api/v1/external-networks",
            &admin,
            json!({"name": "public", "physical_network": "public", "cidr": "198.18.0.0/24"}),
        )
        .await;
    let r = api
        .change(
            Method::PATCH,
            &format!("/api/v1/routers/{router}"),
            &admin,
            Some(json!({"external_gateway": {"external_network_id": net}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = api
        .post(
            "/api/v1/floating-ips",
            &admin,
            json!({"external_network_id": net, "vdc_id": vdc, "port_id": vip_port}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["fixed_ip_address"], "10.0.1.100");
    assert_eq!(r.body["router_id"], router.as_str());
    let vip_fip = r.id();

    // Replace: the subnet and address stay; members are checked again.
    let path = format!("/api/v1/loadbalancers/{lb}");
    let r = api
        .change(
            Method::PUT,
            &path,
            &admin,
            Some(doc(b, None, "TCP", "SOURCE_IP_PORT", "10.0.2.10")),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "vip_subnet_id");
    let r = api
        .change(
            Method::PUT,
            &path,
            &admin,
            Some(doc(a, None, "TCP", "SOURCE_IP_PORT", "10.0.3.9")),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    let r = api
        .change(
            Method::PUT,
            &path,
            &admin,
            Some(doc(a, None, "TCP", "SOURCE_IP", "10.0.2.12")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["vip_address"], "10.0.1.100");
    assert_eq!(r.body["pools"][0]["members"][0]["address"], "10.0.2.12");

    // Deleting the load balancer frees its address.
    for id in [&lb, &udp_lb] {
        let r = api
            .change(
                Method::DELETE,
                &format!("/api/v1/loadbalancers/{id}"),
                &admin,
                None,
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let r = api.get(&format!("/api/v1/ports/{vip_port}"), &admin).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        api.count("resources WHERE kind = 'port'").await,
        ports_before
    );
    let r = api
        .get(&format!("/api/v1/floating-ips/{vip_fip}"), &admin)
        .await;
    assert!(r.body["port_id"].is_null(), "{}", r.body);
    assert_eq!(r.body["status"], "DOWN");
}

#[tokio::test]
async fn floating_ips_count_against_the_vdc_quota() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({"floating_ips": 1})).await;
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    let net = api
        .create(
            "/api/v1/external-networks",
            &admin,
            json!({"name": "public", "physical_network": "public", "cidr": "198.18.0.0/24"}),
        )
        .await;
    let fip = || {
        api.post(
            "/api/v1/floating-ips",
            &tenant,
            json!({"external_network_id": net}),
        )
    };
    let first = fip().await;
    assert_eq!(first.status, 201, "{}", first.body);
    let r = fip().await;
    assert_problem(&r, 409, "quota-exceeded");
    assert_eq!(api.count("resources WHERE kind = 'floating_ip'").await, 1);
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/floating-ips/{}", first.id()),
            &tenant,
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(fip().await.status, 201, "room again after a release");
}

#[tokio::test]
async fn deleted_volumes_wait_in_the_recycle_bin_until_restored_or_purged() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({"volumes": 1})).await;
    let r = api
        .call(
            Method::POST,
            "/api/v1/vdcs",
            Some(&admin),
            &[],
            Some(json!({"name": "bad", "recycle_bin_hours": 9000})),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "recycle_bin_hours");
    let r = api
        .change(
            Method::PATCH,
            &format!("/api/v1/vdcs/{vdc}"),
            &admin,
            Some(json!({"recycle_bin_hours": 24})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["recycle_bin_hours"], 24);
    let volume = |name: &str| json!({"name": name, "vdc_id": vdc, "size_gib": 1});
    let r = api.post("/api/v1/volumes", &admin, volume("data")).await;
    assert_eq!(r.status, 202, "{}", r.body);
    api.agent_did(&r.body, "AVAILABLE").await;
    let id = r.body["resource_id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/volumes/{id}");

    // Delete: into the bin, with the time it is purged; the quota is free.
    let before = super::records::now_ms();
    let r = api.change(Method::DELETE, &path, &admin, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "DELETED");
    let purge_at = r.body["purge_at"].as_i64().unwrap();
    assert!(purge_at >= before + 24 * 3_600_000, "{}", r.body);
    let binned = api
        .get(
            &format!("/api/v1/volumes?vdc_id={vdc}&status=DELETED"),
            &admin,
        )
        .await;
    assert_eq!(
        binned.body["items"][0]["id"],
        id.as_str(),
        "{}",
        binned.body
    );
    let other = api.post("/api/v1/volumes", &admin, volume("other")).await;
    assert_eq!(other.status, 202, "a binned volume counts against no quota");
    api.agent_did(&other.body, "AVAILABLE").await;

    // In the bin it is good for nothing but restore and purge.
    let r = api
        .post(
            "/api/v1/vms",
            &admin,
            json!({"name": "vm", "vdc_id": vdc, "vcpus": 1, "memory_mib": 128,
                   "volume_ids": [id], "start": false}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "volume_ids[0]");
    let r = api
        .post(
            &format!("{path}/actions/copy"),
            &admin,
            json!({"name": "copy"}),
        )
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .post(
            &format!(
                "/api/v1/volumes/{}/actions/restore",
                other.body["resource_id"].as_str().unwrap()
            ),
            &admin,
            json!({}),
        )
        .await;
    assert_problem(&r, 409, "conflict");

    // Restore needs room in the quota; with room it is AVAILABLE again.
    let r = api
        .post(&format!("{path}/actions/restore"), &admin, json!({}))
        .await;
    assert_problem(&r, 409, "quota-exceeded");
    let other_path = format!(
        "/api/v1/volumes/{}?purge=true",
        other.body["resource_id"].as_str().unwrap()
    );
    let r = api.change(Method::DELETE, &other_path, &admin, None).await;
    assert_eq!(r.status, 204, "purge=true skips the bin: {}", r.body);
    let r = api
        .post(&format!("{path}/actions/restore"), &admin, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "AVAILABLE");
    assert!(r.body["purge_at"].is_null(), "{}", r.body);

    // Deleted again, then purged when its time is up (the agent's sweep).
    let r = api.change(Method::DELETE, &path, &admin, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let purge_at = r.body["purge_at"].as_i64().unwrap();
    {
        let mut tx = api.state.store.begin_write().await.unwrap();
        let early = super::volumes::purge_expired(&mut tx, purge_at - 1)
            .await
            .unwrap();
        assert!(early.is_empty(), "{early:?}");
        let purged = super::volumes::purge_expired(&mut tx, purge_at)
            .await
            .unwrap();
        assert_eq!(purged, vec![id.clone()]);
        tx.commit().await.unwrap();
    }
    assert_eq!(api.get(&path, &admin).await.status, 404);

    // A delete of a volume already in the bin purges it at once; without a
    // bin a delete is final, as before.
    let r = api.post("/api/v1/volumes", &admin, volume("third")).await;
    api.agent_did(&r.body, "AVAILABLE").await;
    let third = format!(
        "/api/v1/volumes/{}",
        r.body["resource_id"].as_str().unwrap()
    );
    assert_eq!(
        api.change(Method::DELETE, &third, &admin, None)
            .await
            .status,
        200
    );
    assert_eq!(
        api.change(Method::DELETE, &third, &admin, None)
            .await
            .status,
        204
    );
    assert_eq!(api.get(&third, &admin).await.status, 404);
    let plain = api.vdc(&admin, "plain", json!({})).await;
    let r = api
        .post(
            "/api/v1/volumes",
            &admin,
            json!({"name": "v", "vdc_id": plain, "size_gib": 1}),
        )
        .await;
    api.agent_did(&r.body, "AVAILABLE").await;
    let v = format!(
        "/api/v1/volumes/{}",
        r.body["resource_id"].as_str().unwrap()
    );
    assert_eq!(
        api.change(Method::DELETE, &v, &admin, None).await.status,
        204
    );
    assert_eq!(api.get(&v, &admin).await.status, 404);
}

#[tokio::test]
async fn address_groups_and_port_sets_feed_security_group_rules() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    let other = api.vdc(&admin, "other", json!({})).await;
    let tenant = api.user(&admin, "ann", "vdc-user", &vdc).await;
    let stranger = api.user(&admin, "bob", "vdc-user", &other).await;

    // Address groups: bad entries are named, nothing is stored.
    for (addresses, field) in [
        (json!(["10.0.0.0/33"]), "addresses[0]"),
        (json!(["10.0.0.0/8", "nonsense"]), "addresses[1]"),
        (json!(["10.0.0.1/24"]), "addresses[0]"),
        (
            json!(["fd00::/64", "10.1.0.0/16", "FD00::/64"]),
            "addresses[2]",
        ),
    ] {
        let r = api
            .post(
                "/api/v1/address-groups",
                &tenant,
                json!({"name": "ag", "addresses": addresses}),
            )
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{addresses}: {}", r.body);
    }
    assert_eq!(
        api.get("/api/v1/address-groups", &tenant).await.body["items"],
        json!([])
    );
    // Normalized (a bare address is a host prefix, IPv6 canonical) and sorted.
    let r = api
        .post(
            "/api/v1/address-groups",
            &tenant,
            json!({"name": "admins", "description": "jump hosts",
                   "addresses": ["192.0.2.7", "FD00:0:0:1::/64", "10.1.0.0/16"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.headers.contains_key("etag") && r.headers.contains_key("location"));
    assert_eq!(
        r.body["addresses"],
        json!(["10.1.0.0/16", "192.0.2.7/32", "fd00:0:0:1::/64"])
    );
    assert_eq!(r.body["vdc_id"], vdc);
    let ag = r.id();
    let ag_path = format!("/api/v1/address-groups/{ag}");
    // Actions: add folds what is there, remove refuses what is not.
    let r = api
        .post(
            &format!("{ag_path}/actions/add-addresses"),
            &tenant,
            json!({"addresses": ["10.1.0.0/16", "10.9.9.9/32"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["addresses"],
        json!([
            "10.1.0.0/16",
            "10.9.9.9/32",
            "192.0.2.7/32",
            "fd00:0:0:1::/64"
        ])
    );
    assert_eq!(r.body["revision"], 2);
    let r = api
        .post(
            &format!("{ag_path}/actions/remove-addresses"),
            &tenant,
            json!({"addresses": ["192.0.2.7/32", "10.2.0.0/16"]}),
        )
        .await;
    assert_problem(&r, 422, "invalid-field");
    assert_eq!(r.body["field"], "addresses[1]", "{}", r.body);
    let r = api
        .post(
            &format!("{ag_path}/actions/remove-addresses"),
            &tenant,
            json!({"addresses": ["192.0.2.7"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["addresses"],
        json!(["10.1.0.0/16", "10.9.9.9/32", "fd00:0:0:1::/64"])
    );
    let r = api
        .post(
            &format!("{ag_path}/actions/add-addresses"),
            &stranger,
            json!({"addresses": ["10.0.0.0/8"]}),
        )
        .await;
    assert_problem(&r, 404, "not-found");
    // PATCH replaces the list, guarded by If-Match.
    let r = api
        .call(
            Method::PATCH,
            &ag_path,
            Some(&tenant),
            &[],
            Some(json!({"addresses": []})),
        )
        .await;
    assert_eq!(r.status, 428, "{}", r.body);
    let r = api
        .change(
            Method::PATCH,
            &ag_path,
            &tenant,
            Some(json!({"name": "ops", "addresses": ["10.1.0.0/16", "fd00:0:0:1::/64"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["name"], "ops");
    assert_eq!(r.body["description"], "jump hosts");
    let listed = api.get("/api/v1/address-groups?name=ops", &tenant).await;
    assert_eq!(listed.body["items"][0]["id"], ag);
    assert_eq!(
        api.get("/api/v1/address-groups", &stranger).await.body["items"],
        json!([])
    );
    assert_problem(&api.get(&ag_path, &stranger).await, 404, "not-found");

    // Port sets.
    for (ports, field) in [
        (json!([]), "ports"),
        (json!([{"min": 90, "max": 80}]), "ports[0].min"),
        (json!([{"min": 0, "max": 80}]), "ports[0].min"),
        (
            json!([{"min": 80, "max": 80}, {"min": 8000, "max": 8099}, {"min": 8050, "max": 9000}]),
            "ports[2]",
        ),
    ] {
        let r = api
            .post(
                "/api/v1/port-sets",
                &tenant,
                json!({"name": "ps", "ports": ports}),
            )
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{ports}: {}", r.body);
    }
    let r = api
        .post(
            "/api/v1/port-sets",
            &tenant,
            json!({"name": "web", "ports": [{"min": 8000, "max": 8099}, {"min": 80, "max": 80}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["ports"],
        json!([{"min": 80, "max": 80}, {"min": 8000, "max": 8099}])
    );
    let ps = r.id();
    let ps_path = format!("/api/v1/port-sets/{ps}");
    let r = api
        .change(
            Method::PATCH,
            &ps_path,
            &tenant,
            Some(json!({"ports": [{"min": 443, "max": 443}, {"min": 80, "max": 80}]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["ports"],
        json!([{"min": 80, "max": 80}, {"min": 443, "max": 443}])
    );
    assert_eq!(
        api.get("/api/v1/port-sets", &tenant).await.body["items"][0]["id"],
        ps
    );
    let theirs = api
        .create(
            "/api/v1/address-groups",
            &stranger,
            json!({"name": "theirs", "addresses": ["10.0.0.0/8"]}),
        )
        .await;
    let their_ports = api
        .create(
            "/api/v1/port-sets",
            &stranger,
            json!({"name": "theirs", "ports": [{"min": 22, "max": 22}]}),
        )
        .await;

    // Rules name them; exclusivity and references are checked per field.
    let rules = |third: Value| {
        json!({"name": "web", "rules": [
            {"direction": "ingress", "protocol": "tcp", "remote_address_group_id": ag, "port_set_id": ps},
            {"direction": "ingress", "protocol": "udp", "port_set_id": ps, "remote_cidr": "10.0.0.0/8"},
            third,
        ]})
    };
    for (third, field) in [
        (
            json!({"direction": "ingress", "protocol": "tcp", "remote_address_group_id": theirs}),
            "rules[2].remote_address_group_id",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "remote_address_group_id": "nope"}),
            "rules[2].remote_address_group_id",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "port_set_id": their_ports}),
            "rules[2].port_set_id",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "remote_cidr": "10.0.0.0/8", "remote_address_group_id": ag}),
            "rules[2].remote_address_group_id",
        ),
        (
            json!({"direction": "ingress", "protocol": "icmp", "port_set_id": ps}),
            "rules[2].port_set_id",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "port_set_id": ps, "port_range_min": 1, "port_range_max": 2}),
            "rules[2].port_set_id",
        ),
    ] {
        let r = api
            .post("/api/v1/security-groups", &tenant, rules(third.clone()))
            .await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{third}: {}", r.body);
    }
    let r = api
        .post(
            "/api/v1/security-groups",
            &tenant,
            rules(json!({"direction": "egress", "protocol": "any", "remote_address_group_id": ag})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["rules"][0]["remote_address_group_id"], ag);
    assert_eq!(r.body["rules"][0]["port_set_id"], ps);
    let sg = r.id();

    // In use: deleting is refused, naming the security group.
    for path in [&ag_path, &ps_path] {
        let r = api.change(Method::DELETE, path, &tenant, None).await;
        assert_problem(&r, 409, "conflict");
        assert!(
            r.body["detail"].as_str().unwrap().contains(&sg),
            "{}",
            r.body
        );
    }
    let r = api
        .change(
            Method::PATCH,
            &format!("/api/v1/security-groups/{sg}"),
            &tenant,
            Some(json!({"rules": []})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for path in [&ag_path, &ps_path] {
        let r = api.change(Method::DELETE, path, &tenant, None).await;
        assert_eq!(r.status, 204, "{}", r.body);
        assert_problem(&api.get(path, &tenant).await, 404, "not-found");
    }
    // Every change is in the feed and the audit log.
    let events: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM events WHERE resource_type IN ('address_group', 'port_set')",
    )
    .fetch_one(api.state.store.pool())
    .await
    .unwrap();
    // ag: create, add, remove, patch, delete; theirs: create; ps: create,
    // patch, delete; their_ports: create.
    assert_eq!(events, 10);
    let audited: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE path LIKE '/api/v1/address-groups%' OR path LIKE '/api/v1/port-sets%'",
    )
    .fetch_one(api.state.store.pool())
    .await
    .unwrap();
    assert!(audited >= 10, "{audited}");
}

#[tokio::test]
async fn vm_backups_cut_every_disk_and_restore_into_a_new_vm() {
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    api.host("h1").await;
    let vpc = api
        .create("/api/v1/vpcs", &admin, json!({"name": "n", "vdc_id": vdc}))
        .await;
    let subnet = api
        .post(
            "/api/v1/subnets",
            &admin,
            json!({"name": "s", "vpc_id": vpc, "cidr": "10.0.0.0/24"}),
        )
        .await;
    assert_eq!(subnet.status, 201, "{}", subnet.body);
    let subnet = subnet.id();
    let sg = api
        .create(
            "/api/v1/security-groups",
            &admin,
            json!({"name": "web", "vdc_id": vdc, "rules": []}),
        )
        .await;
    let port = api
        .post(
            "/api/v1/ports",
            &admin,
            json!({"name": "p", "subnet_id": subnet, "fixed_ip": "10.0.0.10",
                   "security_group_ids": [sg]}),
        )
        .await;
    assert_eq!(port.status, 201, "{}", port.body);
    let port = port.id();
    let mut volumes = Vec::new();
    for (name, gib) in [("boot", 1), ("data", 2)] {
        let r = api
            .post(
                "/api/v1/volumes",
                &admin,
                json!({"name": name, "vdc_id": vdc, "size_gib": gib}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        api.agent_did(&r.body, "AVAILABLE").await;
        volumes.push(r.body["resource_id"].as_str().unwrap().to_owned());
    }
    let r = api
        .post(
            "/api/v1/vms",
            &admin,
            json!({"name": "web1", "vdc_id": vdc, "vcpus": 2, "memory_mib": 256,
                   "volume_ids": volumes, "port_ids": [port], "start": false}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.body["resource_id"].as_str().unwrap().to_owned();
    let backups_of_vm = format!("/api/v1/vms/{vm}/backups");
    // Still CREATING: not yet.
    let r = api.post(&backups_of_vm, &admin, json!({"name": "b"})).await;
    assert_problem(&r, 409, "conflict");
    api.agent_did(&queued_task(&api, &admin, &vm).await, "STOPPED")
        .await;
    for v in &volumes {
        api.set_status("volume", v, "IN_USE").await;
    }

    let r = api
        .post(&backups_of_vm, &admin, json!({"name": "b", "bogus": 1}))
        .await;
    assert_problem(&r, 400, "bad-json");
    let r = api.post(&backups_of_vm, &admin, json!({"name": "b"})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["action"], "backup");
    assert_eq!(r.body["resource_id"], vm.as_str());
    let task = r.body.clone();
    let id = task["params"]["vm_backup_id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/vm-backups/{id}");
    let b = api.get(&path, &admin).await;
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(b.body["status"], "CREATING");
    assert_eq!(b.body["vm_id"], vm.as_str());
    assert_eq!(b.body["vcpus"], 2);
    assert_eq!(b.body["memory_mib"], 256);
    assert_eq!(b.body["host_id"], "h1");
    assert_eq!(b.body["nics"][0]["subnet_id"], subnet.as_str());
    assert_eq!(b.body["nics"][0]["fixed_ip"], "10.0.0.10");
    assert_eq!(b.body["nics"][0]["security_group_ids"][0], sg.as_str());
    let disks = b.body["disks"].as_array().unwrap().clone();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[1]["volume_id"], volumes[1].as_str());
    assert_eq!(disks[1]["size_bytes"], 2u64 << 30);
    let disk_backup = disks[0]["backup_id"].as_str().unwrap().to_owned();
    let d = api
        .get(&format!("/api/v1/backups?parent_id={}", volumes[0]), &admin)
        .await;
    assert_eq!(d.body["items"][0]["id"], disk_backup.as_str(), "{}", d.body);
    assert_eq!(d.body["items"][0]["vm_backup_id"], id.as_str());
    // One operation at a time: no second backup, no delete, no restore yet.
    let r = api
        .post(&backups_of_vm, &admin, json!({"name": "b2"}))
        .await;
    assert_problem(&r, 409, "conflict");
    let r = api.change(Method::DELETE, &path, &admin, None).await;
    assert_problem(&r, 409, "conflict");
    let restore = format!("{path}/actions/restore");
    let r = api.post(&restore, &admin, json!({"name": "again"})).await;
    assert_problem(&r, 409, "conflict");

    // What the agent does once the points are taken.
    api.agent_did(&task, "STOPPED").await;
    api.set_status("vm_backup", &id, "AVAILABLE").await;
    for d in &disks {
        api.set_status("backup", d["backup_id"].as_str().unwrap(), "AVAILABLE")
            .await;
    }
    let r = api
        .change(
            Method::DELETE,
            &format!("/api/v1/backups/{disk_backup}"),
            &admin,
            None,
        )
        .await;
    assert_problem(&r, 409, "conflict");
    assert!(
        r.body["detail"].as_str().unwrap().contains(&id),
        "{}",
        r.body
    );

    // NICs are edited, never added or removed; every edit is checked.
    for (body, field) in [
        (json!({"name": "again", "nics": []}), "nics"),
        (json!({"name": "again", "nics": [{}, {}]}), "nics"),
        (
            json!({"name": "again", "nics": [{"subnet_id": "nope"}]}),
            "nics[0].subnet_id",
        ),
        (
            json!({"name": "again", "nics": [{"security_group_ids": ["nope"]}]}),
            "nics[0].security_group_ids[0]",
        ),
        (
            json!({"name": "again", "nics": [{"fixed_ip": "10.9.9.9"}]}),
            "nics[0].fixed_ip",
        ),
    ] {
        let r = api.post(&restore, &admin, body.clone()).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{body}: {}", r.body);
    }
    // The backed-up address is still the source's: a new one by default.
    let r = api
        .post(
            &restore,
            &admin,
            json!({"name": "again", "start": false, "nics": [{"fixed_ip": "10.0.0.20"}]}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["action"], "create");
    let restored = r.body["resource_id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["params"]["restore"]["vm_backup_id"], id.as_str());
    assert_eq!(r.body["params"]["start"], false);
    let v = api.get(&format!("/api/v1/vms/{restored}"), &admin).await;
    assert_eq!(v.body["status"], "CREATING");
    assert_eq!(v.body["name"], "again");
    assert_eq!(v.body["vcpus"], 2);
    assert_eq!(v.body["host_id"], "h1");
    let new_volumes = v.body["volume_ids"].as_array().unwrap().clone();
    assert_eq!(new_volumes.len(), 2);
    for (i, nv) in new_volumes.iter().enumerate() {
        assert_ne!(nv, volumes[i].as_str());
        let vol = api
            .get(&format!("/api/v1/volumes/{}", nv.as_str().unwrap()), &admin)
            .await;
        assert_eq!(vol.body["status"], "CREATING");
        assert_eq!(vol.body["attached_to"], restored.as_str());
        assert_eq!(vol.body["size_bytes"], disks[i]["size_bytes"]);
        assert_eq!(
            r.body["params"]["restore"]["disks"][i]["backup_id"],
            disks[i]["backup_id"]
        );
    }
    let nic = api
        .get(
            &format!("/api/v1/ports/{}", v.body["port_ids"][0].as_str().unwrap()),
            &admin,
        )
        .await;
    assert_eq!(nic.body["fixed_ip"], "10.0.0.20");
    assert_eq!(nic.body["device_id"], restored.as_str());
    assert_eq!(nic.body["security_group_ids"][0], sg.as_str());

    // In place: over the VM itself (keeps its NICs) or one of its disks.
    for (body, field) in [
        (json!({"in_place": true, "name": "x"}), "name"),
        (json!({"in_place": true, "nics": [{}]}), "nics"),
        (json!({}), "name"),
    ] {
        let r = api.post(&restore, &admin, body.clone()).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{body}: {}", r.body);
    }
    let r = api.post(&restore, &admin, json!({"in_place": true})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["action"], "restore-backup");
    assert_eq!(r.body["resource_id"], vm.as_str());
    let in_place = r.body.clone();
    // One operation at a time on the VM.
    let r = api.post(&restore, &admin, json!({"in_place": true})).await;
    assert_problem(&r, 409, "conflict");
    api.agent_did(&in_place, "STOPPED").await;
    let disk_restore = format!("/api/v1/backups/{disk_backup}/actions/restore");
    let r = api
        .post(&disk_restore, &admin, json!({"in_place": true}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["action"], "restore");
    assert_eq!(r.body["resource_id"], volumes[0].as_str());
    api.agent_did(&r.body, "IN_USE").await;
    api.set_status("vm", &vm, "RUNNING").await;
    let r = api.post(&restore, &admin, json!({"in_place": true})).await;
    assert_problem(&r, 409, "conflict");
    let r = api
        .post(&disk_restore, &admin, json!({"in_place": true}))
        .await;
    assert_problem(&r, 409, "conflict");

    // The VM and its disks go; the backup stays, and still restores.
    {
        let mut tx = api.state.store.begin_write().await.unwrap();
        for (kind, id) in [("vm", &vm), ("volume", &volumes[0])] {
            let record = super::records::get(&mut tx, kind, id)
                .await
                .unwrap()
                .unwrap();
            super::records::delete(&mut tx, &record, kind)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let b = api.get(&path, &admin).await;
    assert_eq!(b.body["status"], "AVAILABLE", "{}", b.body);
    let r = api.post(&restore, &admin, json!({"in_place": true})).await;
    assert_problem(&r, 409, "conflict");
    assert!(
        r.body["detail"].as_str().unwrap().contains("deleted"),
        "{}",
        r.body
    );
    let d = api
        .get(&format!("/api/v1/backups/{disk_backup}"), &admin)
        .await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(d.body["parent_id"].is_null(), "{}", d.body);

    let r = api.change(Method::DELETE, &path, &admin, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["resource_type"], "vm_backup");
    assert_eq!(r.body["action"], "delete");
    assert_eq!(api.get(&path, &admin).await.body["status"], "DELETING");
}

#[tokio::test]
async fn backup_policies_follow_cron_and_single_time_schedules_and_back_up_vms() {
    use super::backup_policies::run_due;
    let api = Api::new().await;
    let admin = api.admin().await;
    let vdc = api.vdc(&admin, "acme", json!({})).await;
    api.host("h1").await;
    let mut vols = Vec::new();
    for name in ["boot", "spare"] {
        let r = api
            .post(
                "/api/v1/volumes",
                &admin,
                json!({"name": name, "vdc_id": vdc, "size_gib": 1}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        api.agent_did(&r.body, "AVAILABLE").await;
        vols.push(r.body["resource_id"].as_str().unwrap().to_owned());
    }
    let r = api
        .post(
            "/api/v1/vms",
            &admin,
            json!({"name": "vm", "vdc_id": vdc, "vcpus": 1, "memory_mib": 128,
                   "volume_ids": [vols[0]], "start": false}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.body["resource_id"].as_str().unwrap().to_owned();
    api.agent_did(&queued_task(&api, &admin, &vm).await, "STOPPED")
        .await;
    api.set_status("volume", &vols[0], "IN_USE").await;

    for (body, field) in [
        (json!({"cron": "61 * * * *"}), "cron"),
        (json!({"cron": "0 2 * * * *"}), "cron"),
        (
            json!({"cron": "0 2 * * *", "interval_seconds": 3600}),
            "interval_seconds",
        ),
        (json!({}), "interval_seconds"),
        (
            json!({"cron": "0 2 * * *", "vm_ids": ["nope"]}),
            "vm_ids[0]",
        ),
        (json!({"cron": "0 2 * * *", "vm_ids": []}), "volume_ids"),
        (
            json!({"cron": "0 2 * * *", "max_age_hours": 0}),
            "max_age_hours",
        ),
    ] {
        let mut b = json!({"name": "p", "vdc_id": vdc, "retention": 1, "vm_ids": [vm]});
        for (k, v) in body.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = api.post("/api/v1/backup-policies", &admin, b).await;
        assert_problem(&r, 422, "invalid-field");
        assert_eq!(r.body["field"], field, "{body}: {}", r.body);
    }

    let store = &api.state.store;
    let run = |now: i64| async move {
        let mut tx = store.begin_write().await.unwrap();
        let n = run_due(&mut tx, now).await.unwrap();
        tx.commit().await.unwrap();
        n
    };
    const DAY: i64 = 86_400_000;
    // Nightly at 02:00 UTC: not due at once, but at the next 02:00.
    let created = api
        .post(
            "/api/v1/backup-policies",
            &admin,
            json!({"name": "nightly", "vdc_id": vdc, "vm_ids": [vm], "cron": "0 2 * * *",
                   "retention": 1}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let policy_path = format!("/api/v1/backup-policies/{}", created.id());
    let first = created.body["next_run_at"].as_i64().unwrap();
    assert_eq!(first.rem_euclid(DAY), 2 * 3_600_000, "{}", created.body);
    assert!(first > super::records::now_ms() && first <= super::records::now_ms() + DAY);
    assert_eq!(run(first - 1).await, 0);
    // Three nights; the agent takes each VM backup; retention 1 keeps the
    // newest taken one (the round's own is not counted until it is taken).
    for night in 0..3 {
        assert_eq!(run(first + night * DAY).await, 1);
        let task = queued_task(&api, &admin, &vm).await;
        assert_eq!(task["action"], "backup", "{task}");
        let vb = task["params"]["vm_backup_id"].as_str().unwrap().to_owned();
        let b = api.get(&format!("/api/v1/vm-backups/{vb}"), &admin).await;
        assert_eq!(b.body["policy_id"], created.id().as_str(), "{}", b.body);
        api.agent_did(&task, "STOPPED").await;
        api.set_status("vm_backup", &vb, "AVAILABLE").await;
        let p = api.get(&policy_path, &admin).await;
        assert_eq!(
            p.body["next_run_at"],
            first + (night + 1) * DAY,
            "{}",
            p.body
        );
        assert!(
            p.body["last_result"]
                .as_str()
                .unwrap()
                .contains("VM backup queued"),
            "{}",
            p.body
        );
    }
    let listed = api.get("/api/v1/vm-backups?sort=created_at", &admin).await;
    let statuses: Vec<&str> = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["DELETING", "AVAILABLE", "AVAILABLE"],
        "{}",
        listed.body
    );

    // Once: due at its time, then disabled for good.
    let at = super::records::now_ms() + 5 * DAY;
    let once = api
        .post(
            "/api/v1/backup-policies",
            &admin,
            json!({"name": "once", "vdc_id": vdc, "volume_ids": [vols[1]], "once_at": at,
                   "retention": 1}),
        )
        .await;
    assert_eq!(once.status, 201, "{}", once.body);
    assert_eq!(once.body["next_run_at"], at);
    api.change(
        Method::PATCH,
        &policy_path,
        &admin,
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(run(at - 1).await, 0);
    assert_eq!(run(at).await, 1);
    let p = api
        .get(&format!("/api/v1/backup-policies/{}", once.id()), &admin)
        .await;
    assert_eq!(p.body["enabled"], false, "{}", p.body);
    assert!(p.body["next_run_at"].is_null(), "{}", p.body);
    assert_eq!(run(at + 100 * DAY).await, 0);
    // Rescheduled by PATCH: the new cron pattern counts from now.
    let r = api
        .change(
            Method::PATCH,
            &policy_path,
            &admin,
            Some(json!({"cron": "30 * * * *", "enabled": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let next = r.body["next_run_at"].as_i64().unwrap();
    assert_eq!(next.rem_euclid(3_600_000), 30 * 60_000, "{}", r.body);
    assert!(r.body["interval_seconds"].is_null(), "{}", r.body);
}
