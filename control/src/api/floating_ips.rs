//! `/floating-ips`: addresses of an external network that a VDC holds and
//! can put in front of one of its ports (1:1 NAT both ways, distributed:
//! the data plane of the port's host translates). A port is reachable from
//! an external network only through a router that has an interface on the
//! port's subnet and its gateway on that network, so association checks
//! that path, and routers cannot remove it while an association uses it.
//! Instead of a port, a floating IP may forward ports (`port_forwardings`:
//! protocol and external port → a port's address and internal port, DNAT;
//! Neutron's port forwardings), all through one router.
//! DOWN while it neither is associated nor forwards, PENDING until a data
//! plane serves it, then ACTIVE.

use std::net::IpAddr;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::external_networks;
use super::extract::{check_description, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::networks::{present, NOT_REALIZED};
use super::ports::PortSpec;
use super::problem::{ApiError, Problem};
use super::qos_policies;
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::routers::{self, RouterSpec};
use super::AppState;
use crate::store::DbConnection;

pub const KIND: &str = "floating_ip";
/// Not associated with a port.
pub const DOWN: &str = "DOWN";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FloatingIpSpec {
    pub external_network_id: String,
    #[schema(value_type = String)]
    pub floating_ip_address: IpAddr,
    /// The port it is in front of.
    pub port_id: Option<String>,
    /// That port's address.
    #[schema(value_type = Option<String>)]
    pub fixed_ip_address: Option<IpAddr>,
    /// The router through which the port is reached.
    pub router_id: Option<String>,
    pub description: String,
    /// Bandwidth limits of the floating IP (`/qos-policies`, no DSCP).
    #[serde(default)]
    pub qos_policy_id: Option<String>,
    #[serde(default)]
    pub port_forwardings: Vec<PortForwarding>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForwardedProtocol {
    Tcp,
    Udp,
}

impl ForwardedProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardedProtocol::Tcp => "tcp",
            ForwardedProtocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardingRequest {
    pub protocol: ForwardedProtocol,
    pub external_port: u16,
    pub internal_port_id: String,
    pub internal_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortForwarding {
    pub protocol: ForwardedProtocol,
    pub external_port: u16,
    pub internal_port_id: String,
    /// The internal port's address.
    #[schema(value_type = String)]
    pub internal_ip_address: IpAddr,
    pub internal_port: u16,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FloatingIp {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: FloatingIpSpec,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FloatingIpCreate {
    pub external_network_id: String,
    pub vdc_id: Option<String>,
    /// Allocated from the external network's pools when absent.
    #[schema(value_type = Option<String>)]
    pub floating_ip_address: Option<IpAddr>,
    /// Associate at once.
    pub port_id: Option<String>,
    #[serde(default)]
    pub description: String,
    pub qos_policy_id: Option<String>,
    /// Instead of `port_id`: external ports forwarded to ports' addresses.
    #[serde(default)]
    pub port_forwardings: Vec<PortForwardingRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FloatingIpUpdate {
    /// Associates with this port; `null` disassociates.
    #[serde(default, deserialize_with = "present")]
    pub port_id: Option<Option<String>>,
    pub description: Option<String>,
    /// Sets the QoS policy; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    pub qos_policy_id: Option<Option<String>>,
    /// Replaces every port forwarding.
    pub port_forwardings: Option<Vec<PortForwardingRequest>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FloatingIpPage {
    pub items: Vec<FloatingIp>,
    pub next_cursor: Option<String>,
}

impl Resource for FloatingIp {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let status_reason = match record.meta.status.as_str() {
            PENDING => NOT_REALIZED.into(),
            DOWN => "not associated with a port".into(),
            _ => String::new(),
        };
        Ok(FloatingIp {
            spec: record.spec()?,
            meta: record.meta,
            status_reason,
        })
    }
}

/// The router of `vdc_id` that joins `subnet_id` to the external network
/// `network_id`, if any.
fn router_between(routers: &[Record], subnet_id: &str, network_id: &str) -> Option<String> {
    routers.iter().find_map(|r| {
        let spec: RouterSpec = r.spec().ok()?;
        let on_network = spec
            .external_gateway
            .as_ref()
            .is_some_and(|g| g.external_network_id == network_id);
        let on_subnet = spec.interfaces.iter().any(|i| i.subnet_id == subnet_id);
        (on_network && on_subnet).then(|| r.meta.id.clone())
    })
}

/// Checks an association of floating IP `fip_id` (none yet: `None`) on
/// `network_id` in `vdc_id` with `port_id`: the port's address and the
/// router that reaches it.
async fn associate(
    conn: &mut DbConnection,
    vdc_id: &str,
    network_id: &str,
    fip_id: Option<&str>,
    port_id: &str,
) -> Result<(IpAddr, String), ApiError> {
    let reached = reach(conn, vdc_id, network_id, "port_id", port_id).await?;
    for other in records::in_vdc(conn, KIND, vdc_id).await? {
        let other_spec: FloatingIpSpec = other.spec()?;
        if Some(other.meta.id.as_str()) != fip_id && other_spec.port_id.as_deref() == Some(port_id)
        {
            return Err(ApiError::Conflict(format!(
                "port {port_id} already has floating IP {}",
                other_spec.floating_ip_address
            )));
        }
    }
    Ok(reached)
}

/// Resolves port forwardings: every internal port reachable from the
/// network, all through one router, each protocol/external port once.
async fn forwardings(
    conn: &mut DbConnection,
    vdc_id: &str,
    network_id: &str,
    requests: &[PortForwardingRequest],
) -> Result<(Vec<PortForwarding>, Option<String>), ApiError> {
    const MAX: usize = 256;
    if requests.len() > MAX {
        return Err(ApiError::invalid(
            "port_forwardings",
            format!("at most {MAX}"),
        ));
    }
    let mut out = Vec::new();
    let mut through: Option<String> = None;
    for (i, req) in requests.iter().enumerate() {
        let field = |f: &str| format!("port_forwardings[{i}].{f}");
        if req.external_port == 0 {
            return Err(ApiError::invalid(
                field("external_port"),
                "must be 1..=65535",
            ));
        }
        if req.internal_port == 0 {
            return Err(ApiError::invalid(
                field("internal_port"),
                "must be 1..=65535",
            ));
        }
        if requests[..i]
            .iter()
            .any(|r| r.protocol == req.protocol && r.external_port == req.external_port)
        {
            return Err(ApiError::invalid(
                field("external_port"),
                format!(
                    "{} {} is forwarded twice",
                    req.protocol.as_str(),
                    req.external_port
                ),
            ));
        }
        let (ip, router) = reach(
            conn,
            vdc_id,
            network_id,
            &field("internal_port_id"),
            &req.internal_port_id,
        )
        .await?;
        match &through {
            Some(r) if *r != router => {
                return Err(ApiError::invalid(
                    field("internal_port_id"),
                    format!("reached through router {router}, the others through {r}: one router per floating IP"),
                ))
            }
            _ => through = Some(router),
        }
        out.push(PortForwarding {
            protocol: req.protocol,
            external_port: req.external_port,
            internal_port_id: req.internal_port_id.clone(),
            internal_ip_address: ip,
            internal_port: req.internal_port,
        });
    }
    Ok((out, through))
}

/// A port of `vdc_id` reachable from the external network `network_id`:
/// its address and the router between (named `field` in refusals).
async fn reach(
    conn: &mut DbConnection,
    vdc_id: &str,
    network_id: &str,
    field: &str,
    port_id: &str,
) -> Result<(IpAddr, String), ApiError> {
    let port = match records::get(conn, "port", port_id).await? {
        Some(p) if p.meta.vdc_id.as_deref() == Some(vdc_id) => p,
        _ => {
            return Err(ApiError::invalid(
                field,
                format!("no port {port_id} in the floating IP's VDC"),
            ))
        }
    };
    let spec: PortSpec = port.spec()?;
    if !spec.fixed_ip.is_ipv4() {
        return Err(ApiError::invalid(
            field,
            format!(
                "port {port_id} has the IPv6 address {}; floating IPs are IPv4",
                spec.fixed_ip
            ),
        ));
    }
    let mut routers = records::in_vdc(conn, routers::KIND, vdc_id).await?;
    // A load balancer's VIP is reached only through the router balancing it.
    if let Some(device) = &spec.device_id {
        if let Some(lb) = records::get(conn, super::loadbalancers::KIND, device).await? {
            let balancer = lb
                .spec::<super::loadbalancers::LoadBalancerSpec>()?
                .router_id;
            routers.retain(|r| Some(&r.meta.id) == balancer.as_ref());
        }
    }
    let Some(router_id) = router_between(&routers, &spec.subnet_id, network_id) else {
        return Err(ApiError::Conflict(format!(
            "external network {network_id} is not reachable from subnet {}: no router has an \
             interface there and its gateway on that network",
            spec.subnet_id
        )));
    };
    Ok((spec.fixed_ip, router_id))
}

/// Refuses a router change (`spec` is what the router would become; a
/// default spec for a delete) that cuts the path of a floating IP
/// associated through it.
pub async fn check_still_reached(
    conn: &mut DbConnection,
    router_id: &str,
    spec: &RouterSpec,
) -> Result<(), ApiError> {
    for fip in records::all(conn, KIND).await? {
        let fspec: FloatingIpSpec = fip.spec()?;
        if fspec.router_id.as_deref() != Some(router_id) {
            continue;
        }
        let targets = fspec
            .port_id
            .iter()
            .chain(fspec.port_forwardings.iter().map(|f| &f.internal_port_id));
        for port_id in targets {
            let subnet = match records::get(conn, "port", port_id).await? {
                Some(p) => p.spec::<PortSpec>()?.subnet_id,
                None => continue,
            };
            let gateway_kept = spec
                .external_gateway
                .as_ref()
                .is_some_and(|g| g.external_network_id == fspec.external_network_id);
            let interface_kept = spec.interfaces.iter().any(|i| i.subnet_id == subnet);
            if !(gateway_kept && interface_kept) {
                return Err(ApiError::Conflict(format!(
                    "floating IP {} reaches port {port_id} through router {router_id}; disassociate it first",
                    fspec.floating_ip_address
                )));
            }
        }
    }
    Ok(())
}

/// Disassociates the floating IPs of a port that is being deleted, and
/// drops the forwardings to it.
pub async fn release_port(conn: &mut DbConnection, port_id: &str) -> Result<(), ApiError> {
    for fip in records::all(conn, KIND).await? {
        let mut spec: FloatingIpSpec = fip.spec()?;
        let forwarded = spec.port_forwardings.len();
        spec.port_forwardings
            .retain(|f| f.internal_port_id != port_id);
        if spec.port_id.as_deref() == Some(port_id) {
            spec.port_id = None;
            spec.fixed_ip_address = None;
        } else if forwarded == spec.port_forwardings.len() {
            continue;
        }
        let status = if spec.port_id.is_none() && spec.port_forwardings.is_empty() {
            spec.router_id = None;
            DOWN
        } else {
            fip.meta.status.as_str()
        };
        records::observe(conn, KIND, &fip.meta.id, status, Some(to_json(&spec)?)).await?;
    }
    Ok(())
}

/// A floating IP does one of the two: 1:1 for a port, or port forwarding
/// (and QoS meters only the first: the data plane keys meters on 1:1
/// addresses).
fn one_use(port: bool, forwardings: bool, qos: bool) -> Result<(), ApiError> {
    if port && forwardings {
        return Err(ApiError::invalid(
            "port_forwardings",
            "a floating IP is either associated with a port or forwards ports, not both",
        ));
    }
    if qos && forwardings {
        return Err(ApiError::invalid(
            "qos_policy_id",
            "QoS policies apply to floating IPs associated with a port, not to port forwardings",
        ));
    }
    Ok(())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_floating_ip, list_floating_ips))
        .routes(routes!(
            get_floating_ip,
            update_floating_ip,
            delete_floating_ip
        ))
}

#[utoipa::path(post, path = "/floating-ips", tag = "networks", request_body = FloatingIpCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Allocated; DOWN, or PENDING until a data plane serves the association", body = FloatingIp),
        (status = 409, description = "VDC floating IP quota exceeded, no free address, the address is taken, the port is not reachable from the network or has a floating IP", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_floating_ip(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<FloatingIpCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_description(&body.description)?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    let vdc = referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    if let Some(limit) = super::vdcs::quota_of(&vdc)?.floating_ips {
        if records::count(&mut tx, KIND, &vdc_id).await? >= limit {
            return Err(ApiError::QuotaExceeded {
                resource: "floating_ips",
                limit,
            });
        }
    }
    let (network, _) =
        external_networks::referenced(&mut tx, "external_network_id", &body.external_network_id)
            .await?;
    if let Some(q) = &body.qos_policy_id {
        qos_policies::check_reference(&mut tx, Some(&vdc_id), "qos_policy_id", q, true).await?;
    }
    one_use(
        body.port_id.is_some(),
        !body.port_forwardings.is_empty(),
        body.qos_policy_id.is_some(),
    )?;
    let (port_forwardings, forwarded_through) =
        forwardings(&mut tx, &vdc_id, &network.meta.id, &body.port_forwardings).await?;
    let (fixed_ip_address, router_id) = match &body.port_id {
        Some(port_id) => {
            let (ip, router) = associate(&mut tx, &vdc_id, &network.meta.id, None, port_id).await?;
            (Some(ip), Some(router))
        }
        None => (None, forwarded_through),
    };
    let address = external_networks::allocate(
        &mut tx,
        &network,
        body.floating_ip_address,
        "floating_ip_address",
    )
    .await?;
    let status = if router_id.is_some() { PENDING } else { DOWN };
    let spec = FloatingIpSpec {
        external_network_id: network.meta.id.clone(),
        floating_ip_address: address,
        port_id: body.port_id,
        fixed_ip_address,
        router_id,
        description: body.description,
        qos_policy_id: body.qos_policy_id,
        port_forwardings,
    };
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: Some(&vdc_id),
            parent_id: Some(&network.meta.id),
            name: &address.to_string(),
            spec: to_json(&spec)?,
            status,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/floating-ips/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &FloatingIp::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/floating-ips", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = FloatingIpPage)), security(("bearer" = [])))]
async fn list_floating_ips(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<FloatingIpPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<FloatingIp>(&state, &principal, &query).await?;
    Ok(Json(FloatingIpPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/floating-ips/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The floating IP", body = FloatingIp),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_floating_ip(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<FloatingIp>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/floating-ips/{id}", tag = "networks", request_body = FloatingIpUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = FloatingIp),
        (status = 409, description = "The port is not reachable from the network or has a floating IP", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_floating_ip(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<FloatingIpUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<FloatingIp>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: FloatingIpSpec = record.spec()?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    if let Some(policy) = body.qos_policy_id {
        if let Some(q) = &policy {
            qos_policies::check_reference(
                &mut tx,
                record.meta.vdc_id.as_deref(),
                "qos_policy_id",
                q,
                true,
            )
            .await?;
        }
        spec.qos_policy_id = policy;
    }
    let mut status = record.meta.status.clone();
    let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
    if let Some(requests) = &body.port_forwardings {
        let (resolved, through) =
            forwardings(&mut tx, &vdc_id, &spec.external_network_id, requests).await?;
        if resolved != spec.port_forwardings {
            status = PENDING.into();
        }
        spec.port_forwardings = resolved;
        if spec.port_id.is_none() {
            spec.router_id = through;
        }
    }
    match body.port_id {
        Some(Some(port_id)) => {
            let (ip, router) = associate(
                &mut tx,
                &vdc_id,
                &spec.external_network_id,
                Some(&id),
                &port_id,
            )
            .await?;
            if spec.port_id.as_deref() != Some(port_id.as_str()) {
                status = PENDING.into();
            }
            spec.port_id = Some(port_id);
            spec.fixed_ip_address = Some(ip);
            spec.router_id = Some(router);
        }
        Some(None) => {
            spec.port_id = None;
            spec.fixed_ip_address = None;
            if spec.port_forwardings.is_empty() {
                spec.router_id = None;
            }
        }
        None => {}
    }
    one_use(
        spec.port_id.is_some(),
        !spec.port_forwardings.is_empty(),
        spec.qos_policy_id.is_some(),
    )?;
    if spec.router_id.is_none() {
        status = DOWN.into();
    }
    // Spec and status in one write (one revision, one event).
    let updated = records::observe(&mut tx, KIND, &id, &status, Some(to_json(&spec)?))
        .await?
        .ok_or(ApiError::NotFound)?;
    tx.commit().await?;
    ok::<FloatingIp>(updated)
}

#[utoipa::path(delete, path = "/floating-ips/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Released (the translation stops)"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_floating_ip(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tx, record) =
        begin_change::<FloatingIp>(&state, &principal, Action::Delete, &id, &headers).await?;
    finish_delete::<FloatingIp>(tx, &record).await
}
