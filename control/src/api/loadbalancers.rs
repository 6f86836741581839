//! `/loadbalancers`: L4/L7 load balancers. One resource holds the whole
//! Octavia-shaped document (listeners with L7 policies, pools with members
//! and a health monitor, nested; cross references by id), checked at once
//! by the same compiler the proxy runs, so what the API accepts the proxy
//! can serve. The host agent runs one `keel lb` per load balancer and
//! reports the proxy's status tree (member health) back as `observed`.
//!
//! Nested objects without an `id` get one. Two kinds of VIP:
//! - `vip_address` alone: an address of the host the agent runs on
//!   (loopback on a single-host appliance), served by the proxy (L4 and L7);
//! - `vip_subnet_id` (Octavia's field): an address on a VPC subnet, held by
//!   a port of the subnet (`vip_port_id`, taken from the pools unless
//!   `vip_address` names one) and served by the data plane's L4 balancer in
//!   the VDC router that has an interface on the subnet (`router_id`).
//!   Members must be on that router's subnets. What the data plane cannot
//!   do is refused with the reason ([`keel_lb::l4`]).

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
use super::networks::SubnetSpec;
use super::ports::{self, NewPort, PortSpec};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::routers::RouterSpec;
use super::AppState;

pub const KIND: &str = "loadbalancer";
/// The proxy serves the current document.
pub const ACTIVE: &str = "ACTIVE";
/// The proxy could not serve it (`status_reason` says why).
pub const ERROR: &str = "ERROR";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadBalancerSpec {
    pub description: String,
    /// What the proxy (or, with a VPC VIP, the data plane) runs.
    pub config: keel_lb::LoadBalancer,
    /// With a VPC VIP: its subnet, the port holding the address and the
    /// router whose data plane serves it.
    #[serde(default)]
    pub vip_subnet_id: Option<String>,
    #[serde(default)]
    pub vip_port_id: Option<String>,
    #[serde(default)]
    pub router_id: Option<String>,
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
    /// The VPC subnet of the VIP (`null`: a host VIP served by the proxy).
    pub vip_subnet_id: Option<String>,
    /// The port that holds a VPC VIP's address.
    pub vip_port_id: Option<String>,
    /// The router whose data plane balances a VPC VIP.
    pub router_id: Option<String>,
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
    /// Required for a host VIP; with `vip_subnet_id`, the address wanted
    /// on the subnet (default: one from its pools). Kept on replace.
    #[schema(value_type = Option<String>)]
    pub vip_address: Option<IpAddr>,
    /// A VPC subnet of the VDC: the VIP is served by the data plane (TCP
    /// and UDP listeners). Cannot change on replace.
    pub vip_subnet_id: Option<String>,
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
            vip_subnet_id: spec.vip_subnet_id,
            vip_port_id: spec.vip_port_id,
            router_id: spec.router_id,
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

/// Whether a stored load balancer has its VIP on a VPC subnet (served by
/// the data plane, not by a proxy).
pub fn on_vpc(record: &Record) -> bool {
    record
        .spec
        .get("vip_subnet_id")
        .is_some_and(|s| !s.is_null())
}

/// Builds and checks the proxy's document (with `vpc`, the data plane's):
/// every error names its place. A VPC VIP not chosen yet is checked as
/// `0.0.0.0` and set once its port has it.
fn compile(
    id: &str,
    body: &LoadBalancerCreate,
    vpc: bool,
) -> Result<keel_lb::LoadBalancer, ApiError> {
    let vip = match (body.vip_address, vpc) {
        (Some(vip), _) => vip,
        (None, true) => IpAddr::from([0, 0, 0, 0]),
        (None, false) => {
            return Err(ApiError::invalid(
                "vip_address",
                "required without vip_subnet_id",
            ))
        }
    };
    let mut listeners = body.listeners.clone();
    let mut pools = body.pools.clone();
    fill_ids(&mut listeners, &["l7policies"]);
    fill_ids(&mut pools, &["members"]);
    let doc = serde_json::json!({
        "id": id,
        "name": body.name,
        "vip_address": vip,
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
    if vpc {
        keel_lb::l4::compile(&config, "")
            .map_err(|e| ApiError::invalid("load_balancer", e.to_string()))?;
    } else {
        keel_lb::plan::compile(&config)
            .map_err(|e| ApiError::invalid("load_balancer", e.to_string()))?;
    }
    Ok(config)
}

/// The router of `vdc_id` with an interface on `subnet_id`, if any.
async fn router_on(
    conn: &mut crate::store::DbConnection,
    vdc_id: &str,
    subnet_id: &str,
) -> Result<Option<(String, RouterSpec)>, ApiError> {
    for r in records::in_vdc(conn, "router", vdc_id).await? {
        let spec: RouterSpec = r.spec()?;
        if spec.interfaces.iter().any(|i| i.subnet_id == subnet_id) {
            return Ok(Some((r.meta.id, spec)));
        }
    }
    Ok(None)
}

/// The router that serves a VPC VIP on `subnet_id`, after checking that
/// every member is on one of its subnets (the data plane reaches members
/// only through it).
async fn serving_router(
    conn: &mut crate::store::DbConnection,
    vdc_id: &str,
    subnet_id: &str,
    config: &keel_lb::LoadBalancer,
) -> Result<String, ApiError> {
    let (router_id, spec) = router_on(conn, vdc_id, subnet_id).await?.ok_or_else(|| {
        ApiError::Conflict(format!(
            "no router of the VDC has an interface on subnet {subnet_id}: a VPC VIP is \
             balanced by that router's data plane; add an interface first"
        ))
    })?;
    let mut cidrs = Vec::new();
    for i in &spec.interfaces {
        if let Some(subnet) = records::get(conn, "subnet", &i.subnet_id).await? {
            cidrs.push(subnet.spec::<SubnetSpec>()?.cidr);
        }
    }
    for (i, pool) in config.pools.iter().enumerate() {
        for (j, m) in pool.members.iter().enumerate() {
            if !cidrs.iter().any(|c| c.contains(&m.address)) {
                return Err(ApiError::invalid(
                    format!("pools[{i}].members[{j}].address"),
                    format!(
                        "{} is on no subnet of router {router_id}, which balances the VIP",
                        m.address
                    ),
                ));
            }
        }
    }
    Ok(router_id)
}

/// The IPv4 subnet `subnet_id` of `vdc_id` a VIP is asked for on.
async fn vip_subnet(
    conn: &mut crate::store::DbConnection,
    principal: &Principal,
    vdc_id: &str,
    subnet_id: &str,
) -> Result<Record, ApiError> {
    let subnet = match records::get(conn, "subnet", subnet_id).await? {
        Some(s)
            if principal.sees(s.meta.vdc_id.as_deref())
                && s.meta.vdc_id.as_deref() == Some(vdc_id) =>
        {
            s
        }
        _ => {
            return Err(ApiError::invalid(
                "vip_subnet_id",
                format!("no subnet {subnet_id} in VDC {vdc_id}"),
            ))
        }
    };
    if !subnet.spec::<SubnetSpec>()?.cidr.addr().is_ipv4() {
        return Err(ApiError::invalid(
            "vip_subnet_id",
            "an IPv6 subnet: the data plane's balancer is IPv4 only",
        ));
    }
    Ok(subnet)
}

/// Takes the VIP's address on `subnet` for load balancer `id`: a port of
/// the subnet owned by the load balancer.
async fn take_vip_port(
    conn: &mut crate::store::DbConnection,
    subnet: &Record,
    wanted: Option<IpAddr>,
    id: &str,
) -> Result<Record, ApiError> {
    let new = NewPort {
        name: &format!("lb-vip-{id}"),
        fixed_ip: wanted,
        security_group_ids: Vec::new(),
        description: format!("VIP of load balancer {id}"),
        device_id: Some(id.to_owned()),
        delete_with_device: true,
        qos_policy_id: None,
    };
    ports::insert_port(conn, subnet, new)
        .await
        .map_err(|e| match e {
            ApiError::InvalidField { message, .. } => ApiError::InvalidField {
                field: "vip_address".into(),
                message,
            },
            e => e,
        })
}

/// A router change must keep the interface each VPC VIP it balances is on.
pub async fn check_still_served(
    conn: &mut crate::store::DbConnection,
    router_id: &str,
    spec: &RouterSpec,
) -> Result<(), ApiError> {
    for lb in records::all(conn, KIND).await? {
        let lspec: LoadBalancerSpec = lb.spec()?;
        let Some(subnet) = lspec.vip_subnet_id.as_deref() else {
            continue;
        };
        if lspec.router_id.as_deref() == Some(router_id)
            && !spec.interfaces.iter().any(|i| i.subnet_id == subnet)
        {
            return Err(ApiError::Conflict(format!(
                "load balancer {} has its VIP on subnet {subnet}, balanced by router {router_id}; \
                 delete it first",
                lb.meta.id
            )));
        }
    }
    Ok(())
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
        // A VPC VIP has a port of its own: no other load balancer has it.
        if spec.vip_subnet_id.is_some() || spec.config.vip_address != config.vip_address {
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
        (status = 201, description = "Stored; PENDING until the host's proxy (VPC VIP: a host's data plane) serves it, then ACTIVE (or ERROR)", body = LoadBalancer),
        (status = 409, description = "VDC load balancer quota exceeded, a listener port is taken on the VIP, the VIP address is taken, or no router of the VDC is on the VIP's subnet", body = Problem, content_type = "application/problem+json"),
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
    let vdc_id = target_vdc(&principal, body.vdc_id.clone())?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut config = compile(&id, &body, body.vip_subnet_id.is_some())?;
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
    let (mut vip_port_id, mut router_id) = (None, None);
    if let Some(subnet_id) = &body.vip_subnet_id {
        let subnet = vip_subnet(&mut tx, &principal, &vdc_id, subnet_id).await?;
        router_id = Some(serving_router(&mut tx, &vdc_id, subnet_id, &config).await?);
        let port = take_vip_port(&mut tx, &subnet, body.vip_address, &id).await?;
        config.vip_address = port.spec::<PortSpec>()?.fixed_ip;
        vip_port_id = Some(port.meta.id);
    } else {
        check_vip_ports(&mut tx, &config).await?;
    }
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
                vip_subnet_id: body.vip_subnet_id,
                vip_port_id,
                router_id,
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
    let mut config = compile(&id, &body, body.vip_subnet_id.is_some())?;
    let (mut tx, record) =
        begin_change::<LoadBalancer>(&state, &principal, Action::Update, &id, &headers).await?;
    let old: LoadBalancerSpec = record.spec()?;
    if body.vip_subnet_id != old.vip_subnet_id {
        return Err(ApiError::invalid(
            "vip_subnet_id",
            "cannot change: create a new load balancer",
        ));
    }
    let mut router_id = None;
    if let Some(subnet_id) = &old.vip_subnet_id {
        if body
            .vip_address
            .is_some_and(|a| a != old.config.vip_address)
        {
            return Err(ApiError::invalid(
                "vip_address",
                "a VPC VIP's address cannot change: create a new load balancer",
            ));
        }
        config.vip_address = old.config.vip_address;
        let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
        router_id = Some(serving_router(&mut tx, &vdc_id, subnet_id, &config).await?);
    } else {
        check_vip_ports(&mut tx, &config).await?;
    }
    let spec = LoadBalancerSpec {
        description: body.description,
        config,
        vip_subnet_id: old.vip_subnet_id,
        vip_port_id: old.vip_port_id,
        router_id,
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
        (status = 204, description = "Deleted; the host's proxy stops (a VPC VIP's port is deleted with it)"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_lb(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<LoadBalancer>(&state, &principal, Action::Delete, &id, &headers).await?;
    let spec: LoadBalancerSpec = record.spec()?;
    if let Some(port_id) = &spec.vip_port_id {
        super::floating_ips::release_port(&mut tx, port_id).await?;
        if let Some(port) = records::get(&mut tx, ports::KIND, port_id).await? {
            records::delete(&mut tx, &port, ports::KIND).await?;
        }
    }
    let done = finish_delete::<LoadBalancer>(tx, &record).await;
    state.changes.notify_waiters();
    done
}
