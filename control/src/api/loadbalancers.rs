//! `/loadbalancers`: L4/L7 load balancers. One resource holds the whole
//! Octavia-shaped document (listeners with L7 policies, pools with members
//! and a health monitor, nested; cross references by id), checked at once
//! by the same compiler the proxy runs, so what the API accepts the proxy
//! can serve. The host agent runs one `keel lb` per load balancer and
//! reports the proxy's status tree (member health) back as `observed`.
//!
//! Nested objects without an `id` get one. The VIP is an address of the
//! host the agent runs on (loopback on a single-host appliance); VIPs on
//! VPC subnets need the data plane's L4 VIP, which is not wired yet.

use std::net::IpAddr;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, ok, referenced_vdc, Resource,
};
use super::AppState;

pub const KIND: &str = "loadbalancer";
/// The proxy serves the current document.
pub const ACTIVE: &str = "ACTIVE";
/// The proxy could not serve it (`status_reason` says why).
pub const ERROR: &str = "ERROR";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadBalancerSpec {
    pub description: String,
    /// What the proxy runs.
    pub config: keel_lb::LoadBalancer,
    /// The proxy's status tree as the agent last saw it.
    #[serde(default)]
    pub observed: Option<Value>,
    #[serde(default)]
    pub status_reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoadBalancer {
    #[serde(flatten)]
    pub meta: Meta,
    pub description: String,
    #[schema(value_type = String)]
    pub vip_address: IpAddr,
    pub admin_state_up: bool,
    /// Octavia listeners (with `l7policies`), ids filled in.
    #[schema(value_type = Vec<Object>)]
    pub listeners: Value,
    /// Octavia pools (with `members` and `healthmonitor`), ids filled in.
    #[schema(value_type = Vec<Object>)]
    pub pools: Value,
    /// Status tree observed on the host: provisioning and operating status
    /// of every listener, pool and member (ONLINE, ERROR, NO_MONITOR, ...).
    #[schema(value_type = Option<Object>)]
    pub observed: Option<Value>,
    pub status_reason: String,
}

/// The document of a load balancer: create and replace take the same.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerCreate {
    pub name: String,
    /// Owning VDC; tenants may omit it. Ignored on replace.
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    #[schema(value_type = String)]
    pub vip_address: IpAddr,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub listeners: Vec<Value>,
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub pools: Vec<Value>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoadBalancerPage {
    pub items: Vec<LoadBalancer>,
    pub next_cursor: Option<String>,
}

impl Resource for LoadBalancer {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let spec: LoadBalancerSpec = record.spec()?;
        let config = to_json(&spec.config)?;
        Ok(LoadBalancer {
            meta: record.meta,
            description: spec.description,
            vip_address: spec.config.vip_address,
            admin_state_up: spec.config.admin_state_up,
            listeners: config["listeners"].clone(),
            pools: config["pools"].clone(),
            observed: spec.observed,
            status_reason: spec.status_reason,
        })
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_lb, list_lbs))
        .routes(routes!(get_lb, replace_lb, delete_lb))
}

/// Gives every nested object that lacks one an id.
fn fill_ids(items: &mut [Value], children: &[&str]) {
    for item in items {
        if let Some(obj) = item.as_object_mut() {
            obj.entry("id")
                .or_insert_with(|| Value::String(uuid::Uuid::new_v4().to_string()));
            for child in children {
                if let Some(Value::Array(list)) = obj.get_mut(*child) {
                    fill_ids(list, &["rules"]);
                }
            }
        }
    }
}

/// Builds and checks the proxy's document: every error names its place.
fn compile(id: &str, body: &LoadBalancerCreate) -> Result<keel_lb::LoadBalancer, ApiError> {
    let mut listeners = body.listeners.clone();
    let mut pools = body.pools.clone();
    fill_ids(&mut listeners, &["l7policies"]);
    fill_ids(&mut pools, &["members"]);
    let doc = serde_json::json!({
        "id": id,
        "name": body.name,
        "vip_address": body.vip_address,
        "admin_state_up": body.admin_state_up,
        "listeners": listeners,
        "pools": pools,
    });
    let config: keel_lb::LoadBalancer = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(path, e.into_inner().to_string())
    })?;
    // The proxy reads certificates from host files; naming host paths is
    // not something a tenant may do, and keel has no secret store yet.
    if let Some(i) = config
        .listeners
        .iter()
        .position(|l| l.default_tls_certificate.is_some())
    {
        return Err(ApiError::invalid(
            format!("listeners[{i}].default_tls_certificate"),
            "TLS certificates cannot be given through the API yet (no secret store)",
        ));
    }
    keel_lb::plan::compile(&config)
        .map_err(|e| ApiError::invalid("load_balancer", e.to_string()))?;
    Ok(config)
}

/// Two load balancers on one VIP cannot listen on the same port.
async fn check_vip_ports(
    conn: &mut crate::store::DbConnection,
    config: &keel_lb::LoadBalancer,
) -> Result<(), ApiError> {
    for other in records::all(conn, KIND).await? {
        if other.meta.id == config.id {
            continue;
        }
        let spec: LoadBalancerSpec = other.spec()?;
        if spec.config.vip_address != config.vip_address {
            continue;
        }
        for l in &config.listeners {
            if spec
                .config
                .listeners
                .iter()
                .any(|o| o.protocol_port == l.protocol_port)
            {
                return Err(ApiError::Conflict(format!(
                    "{}:{} is already a listener of load balancer {}",
                    config.vip_address, l.protocol_port, other.meta.id
                )));
            }
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/loadbalancers", tag = "networks", request_body = LoadBalancerCreate,
    responses(
        (status = 201, description = "Stored; PENDING until the host's proxy serves it, then ACTIVE (or ERROR)", body = LoadBalancer),
        (status = 409, description = "VDC load balancer quota exceeded, or a listener port is taken on the VIP", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid document: the field path or the failed check is named", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_lb(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<LoadBalancerCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let vdc_id = body
        .vdc_id
        .clone()
        .or_else(|| principal.vdc_id.clone())
        .ok_or_else(|| ApiError::invalid("vdc_id", "required"))?;
    let id = uuid::Uuid::new_v4().to_string();
    let config = compile(&id, &body)?;
    let mut tx = state.store.begin_write().await?;
    let vdc = referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    if let Some(limit) = super::vdcs::quota_of(&vdc)?.load_balancers {
        if records::count(&mut tx, KIND, &vdc_id).await? >= limit {
            return Err(ApiError::QuotaExceeded {
                resource: "load_balancers",
                limit,
            });
        }
    }
    check_vip_ports(&mut tx, &config).await?;
    let record = records::insert_with_id(
        &mut tx,
        &id,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: None,
            name: &body.name,
            spec: to_json(&LoadBalancerSpec {
                description: body.description,
                config,
                observed: None,
                status_reason: String::new(),
            })?,
            status: PENDING,
        },
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    let location = format!("/api/v1/loadbalancers/{id}");
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &LoadBalancer::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/loadbalancers", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = LoadBalancerPage)), security(("bearer" = [])))]
async fn list_lbs(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<LoadBalancerPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<LoadBalancer>(&state, &principal, &query).await?;
    Ok(Json(LoadBalancerPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/loadbalancers/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The load balancer with its observed status tree", body = LoadBalancer),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_lb(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<LoadBalancer>(&state, &principal, &id).await
}

#[utoipa::path(put, path = "/loadbalancers/{id}", tag = "networks", request_body = LoadBalancerCreate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Replaced; PENDING until the proxy applied it in place (established connections stay)", body = LoadBalancer),
        (status = 409, description = "A listener port is taken on the VIP", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid document", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn replace_lb(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<LoadBalancerCreate>,
) -> Result<Response, ApiError> {
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let config = compile(&id, &body)?;
    let (mut tx, record) =
        begin_change::<LoadBalancer>(&state, &principal, Action::Update, &id, &headers).await?;
    check_vip_ports(&mut tx, &config).await?;
    let old: LoadBalancerSpec = record.spec()?;
    let spec = LoadBalancerSpec {
        description: body.description,
        config,
        observed: old.observed,
        status_reason: String::new(),
    };
    let updated = records::update(&mut tx, &record, KIND, &body.name, to_json(&spec)?).await?;
    let updated = records::observe(&mut tx, KIND, &id, PENDING, None)
        .await?
        .unwrap_or(updated);
    tx.commit().await?;
    state.changes.notify_waiters();
    ok::<LoadBalancer>(updated)
}

#[utoipa::path(delete, path = "/loadbalancers/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted; the host's proxy stops"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_lb(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tx, record) =
        begin_change::<LoadBalancer>(&state, &principal, Action::Delete, &id, &headers).await?;
    let done = finish_delete::<LoadBalancer>(tx, &record).await;
    state.changes.notify_waiters();
    done
}
