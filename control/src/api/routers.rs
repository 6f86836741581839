//! `/routers`: VPC routers with interfaces on subnets and static routes.
//! An interface takes the subnet's gateway address unless one is given;
//! a route's next hop must lie in a subnet the router is attached to.
//! Interfaces and routes are replaced as a whole through PATCH + If-Match.
//! An external gateway puts the router on an external network with an
//! address from its pools: the default route leaves there, through SNAT
//! unless `enable_snat` is false, and floating IPs of the router's subnets'
//! ports are reached through it. PENDING until a data plane routes for it.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::store::DbConnection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::external_networks;
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::floating_ips;
use super::listing::{ListQuery, Page};
use super::networks::{not_realized, present, usable, yes, SubnetSpec};
use super::ports::PortSpec;
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, Record, PENDING};
use super::respond::{
    begin_change, create_in_vdc, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::router_rules::{check_firewall, check_policies, FirewallRule, RouterPolicy};
use super::AppState;

pub const KIND: &str = "router";
const MAX_ROUTES: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterfaceRequest {
    pub subnet_id: String,
    /// Defaults to the subnet's gateway address.
    #[schema(value_type = Option<String>)]
    pub ip_address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Interface {
    pub subnet_id: String,
    #[schema(value_type = String)]
    pub ip_address: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StaticRoute {
    #[schema(value_type = String)]
    pub destination: String,
    #[schema(value_type = String)]
    pub nexthop: IpAddr,
}

/// The router's place on an external network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExternalGateway {
    pub external_network_id: String,
    /// Sources of the router's subnets leave as `external_ip`.
    pub enable_snat: bool,
    #[schema(value_type = String)]
    pub external_ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalGatewayRequest {
    pub external_network_id: String,
    #[serde(default = "yes")]
    pub enable_snat: bool,
    /// Allocated from the external network's pools when absent.
    #[schema(value_type = Option<String>)]
    pub external_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterSpec {
    pub description: String,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<StaticRoute>,
    #[serde(default)]
    pub external_gateway: Option<ExternalGateway>,
    #[serde(default)]
    pub firewall_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub policies: Vec<RouterPolicy>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Router {
    #[serde(flatten)]
    pub meta: Meta,
    pub description: String,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<StaticRoute>,
    pub external_gateway: Option<ExternalGateway>,
    pub firewall_rules: Vec<FirewallRule>,
    pub policies: Vec<RouterPolicy>,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterCreate {
    pub name: String,
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub interfaces: Vec<InterfaceRequest>,
    #[serde(default)]
    pub routes: Vec<StaticRoute>,
    pub external_gateway: Option<ExternalGatewayRequest>,
    #[serde(default)]
    pub firewall_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub policies: Vec<RouterPolicy>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces every interface.
    pub interfaces: Option<Vec<InterfaceRequest>>,
    /// Replaces every static route.
    pub routes: Option<Vec<StaticRoute>>,
    /// Sets the gateway; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    pub external_gateway: Option<Option<ExternalGatewayRequest>>,
    /// Replaces every firewall rule.
    pub firewall_rules: Option<Vec<FirewallRule>>,
    /// Replaces every policy.
    pub policies: Option<Vec<RouterPolicy>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouterPage {
    pub items: Vec<Router>,
    pub next_cursor: Option<String>,
}

impl Resource for Router {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let reason = not_realized(&record.meta.status);
        let spec: RouterSpec = record.spec()?;
        Ok(Router {
            meta: record.meta,
            description: spec.description,
            interfaces: spec.interfaces,
            routes: spec.routes,
            external_gateway: spec.external_gateway,
            firewall_rules: spec.firewall_rules,
            policies: spec.policies,
            status_reason: reason,
        })
    }
}

/// Whether a router has an interface on the subnet (blocks its deletion).
pub async fn subnet_in_use(conn: &mut DbConnection, subnet: &Record) -> Result<bool, ApiError> {
    let vdc = subnet.meta.vdc_id.as_deref().unwrap_or("");
    for router in records::in_vdc(conn, KIND, vdc).await? {
        let spec: RouterSpec = router.spec()?;
        if spec
            .interfaces
            .iter()
            .any(|i| i.subnet_id == subnet.meta.id)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Resolves interface requests and checks routes against them.
async fn resolve(
    conn: &mut DbConnection,
    vdc_id: &str,
    router_id: Option<&str>,
    requests: &[InterfaceRequest],
    routes: &[StaticRoute],
) -> Result<(Vec<Interface>, Vec<StaticRoute>), ApiError> {
    let mut interfaces = Vec::new();
    let mut cidrs: Vec<IpNet> = Vec::new();
    let mut seen_vpcs = HashSet::new();
    let other_routers: Vec<RouterSpec> = records::in_vdc(conn, KIND, vdc_id)
        .await?
        .into_iter()
        .filter(|r| Some(r.meta.id.as_str()) != router_id)
        .map(|r| r.spec())
        .collect::<Result<_, _>>()?;
    for (i, req) in requests.iter().enumerate() {
        let field = |f: &str| format!("interfaces[{i}].{f}");
        if requests[..i].iter().any(|r| r.subnet_id == req.subnet_id) {
            return Err(ApiError::invalid(
                field("subnet_id"),
                "subnet attached twice",
            ));
        }
        let subnet = match records::get(conn, "subnet", &req.subnet_id).await? {
            Some(s) if s.meta.vdc_id.as_deref() == Some(vdc_id) => s,
            _ => {
                return Err(ApiError::invalid(
                    field("subnet_id"),
                    format!("no subnet {} in the router's VDC", req.subnet_id),
                ))
            }
        };
        let spec: SubnetSpec = subnet.spec()?;
        seen_vpcs.insert(spec.vpc_id.clone());
        let ip = match req.ip_address.or(spec.gateway_ip) {
            Some(ip) => ip,
            None => {
                return Err(ApiError::invalid(
                    field("ip_address"),
                    "the subnet has no gateway; give an address",
                ))
            }
        };
        if !usable(&spec.cidr, ip) {
            return Err(ApiError::invalid(
                field("ip_address"),
                format!("{ip} is not a host address inside {}", spec.cidr),
            ));
        }
        if spec.reserved_ips.contains(&ip) {
            return Err(ApiError::invalid(
                field("ip_address"),
                format!("{ip} is reserved"),
            ));
        }
        let by_router = other_routers.iter().any(|r| {
            r.interfaces
                .iter()
                .any(|x| x.subnet_id == req.subnet_id && x.ip_address == ip)
        });
        let mut by_port = false;
        for port in records::children(conn, "port", &subnet.meta.id).await? {
            by_port |= port.spec::<PortSpec>()?.fixed_ip == ip;
        }
        if by_router || by_port {
            return Err(ApiError::Conflict(format!(
                "{ip} on subnet {} is already in use",
                req.subnet_id
            )));
        }
        cidrs.push(spec.cidr);
        interfaces.push(Interface {
            subnet_id: req.subnet_id.clone(),
            ip_address: ip,
        });
    }
    if seen_vpcs.len() > 1 {
        return Err(ApiError::invalid(
            "interfaces",
            "all subnets must belong to one VPC (peering is a separate resource)",
        ));
    }
    if routes.len() > MAX_ROUTES {
        return Err(ApiError::invalid("routes", format!("at most {MAX_ROUTES}")));
    }
    let mut out = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let field = |f: &str| format!("routes[{i}].{f}");
        let dest: IpNet = route.destination.parse().map_err(|_| {
            ApiError::invalid(
                field("destination"),
                format!("{:?} is not a CIDR", route.destination),
            )
        })?;
        if dest.trunc() != dest {
            return Err(ApiError::invalid(
                field("destination"),
                format!("host bits set: did you mean {}?", dest.trunc()),
            ));
        }
        if dest.addr().is_ipv4() != route.nexthop.is_ipv4() {
            return Err(ApiError::invalid(
                field("nexthop"),
                "must be of the destination's address family",
            ));
        }
        if !cidrs.iter().any(|c| c.contains(&route.nexthop)) {
            return Err(ApiError::invalid(
                field("nexthop"),
                format!("{} is in no subnet attached to the router", route.nexthop),
            ));
        }
        if interfaces.iter().any(|x| x.ip_address == route.nexthop) {
            return Err(ApiError::invalid(
                field("nexthop"),
                "is the router's own address",
            ));
        }
        if routes[..i]
            .iter()
            .any(|r| r.destination == route.destination)
        {
            return Err(ApiError::invalid(
                field("destination"),
                "two routes for one destination (ECMP is not supported yet)",
            ));
        }
        out.push(StaticRoute {
            destination: dest.to_string(),
            nexthop: route.nexthop,
        });
    }
    Ok((interfaces, out))
}

/// The subnets the interfaces attach, with their CIDRs.
async fn attached(
    conn: &mut DbConnection,
    interfaces: &[Interface],
) -> Result<Vec<(String, IpNet)>, ApiError> {
    let mut out = Vec::new();
    for i in interfaces {
        if let Some(s) = records::get(conn, "subnet", &i.subnet_id).await? {
            out.push((i.subnet_id.clone(), s.spec::<SubnetSpec>()?.cidr));
        }
    }
    Ok(out)
}

/// Resolves a gateway request: the external network must exist; its
/// address is kept while the network stays the same and none is asked for.
async fn resolve_gateway(
    conn: &mut DbConnection,
    current: Option<&ExternalGateway>,
    request: Option<&ExternalGatewayRequest>,
) -> Result<Option<ExternalGateway>, ApiError> {
    let Some(req) = request else {
        return Ok(None);
    };
    let (network, _) = external_networks::referenced(
        conn,
        "external_gateway.external_network_id",
        &req.external_network_id,
    )
    .await?;
    let kept = current.filter(|c| {
        c.external_network_id == req.external_network_id
            && req.external_ip.is_none_or(|ip| ip == c.external_ip)
    });
    let external_ip = match kept {
        Some(c) => c.external_ip,
        None => {
            external_networks::allocate(
                conn,
                &network,
                req.external_ip,
                "external_gateway.external_ip",
            )
            .await?
        }
    };
    Ok(Some(ExternalGateway {
        external_network_id: req.external_network_id.clone(),
        enable_snat: req.enable_snat,
        external_ip,
    }))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_router, list_routers))
        .routes(routes!(get_router, update_router, delete_router))
}

#[utoipa::path(post, path = "/routers", tag = "networks", request_body = RouterCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored; PENDING until a data plane routes for it", body = Router),
        (status = 409, description = "Interface or gateway address in use, or no free external address", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_router(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<RouterCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    let (interfaces, routes) =
        resolve(&mut tx, &vdc_id, None, &body.interfaces, &body.routes).await?;
    let external_gateway = resolve_gateway(&mut tx, None, body.external_gateway.as_ref()).await?;
    check_firewall(&body.firewall_rules)?;
    check_policies(&body.policies, &attached(&mut tx, &interfaces).await?)?;
    let spec = RouterSpec {
        description: body.description,
        interfaces,
        routes,
        external_gateway,
        firewall_rules: body.firewall_rules,
        policies: body.policies,
    };
    create_in_vdc::<Router>(
        tx,
        "/api/v1/routers",
        &vdc_id,
        &body.name,
        to_json(&spec)?,
        PENDING,
    )
    .await
}

#[utoipa::path(get, path = "/routers", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = RouterPage)), security(("bearer" = [])))]
async fn list_routers(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<RouterPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Router>(&state, &principal, &query).await?;
    Ok(Json(RouterPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/routers/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The router", body = Router),
        (status = 404, description = "Not found (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_router(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Router>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/routers/{id}", tag = "networks", request_body = RouterUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = Router),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_router(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<RouterUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<Router>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: RouterSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    let requests = body.interfaces.unwrap_or_else(|| {
        spec.interfaces
            .iter()
            .map(|i| InterfaceRequest {
                subnet_id: i.subnet_id.clone(),
                ip_address: Some(i.ip_address),
            })
            .collect()
    });
    let routes = body.routes.unwrap_or_else(|| spec.routes.clone());
    let vdc_id = record.meta.vdc_id.clone().unwrap_or_default();
    let (interfaces, routes) = resolve(&mut tx, &vdc_id, Some(&id), &requests, &routes).await?;
    spec.interfaces = interfaces;
    spec.routes = routes;
    if let Some(request) = body.external_gateway {
        spec.external_gateway =
            resolve_gateway(&mut tx, spec.external_gateway.as_ref(), request.as_ref()).await?;
    }
    if let Some(rules) = body.firewall_rules {
        spec.firewall_rules = rules;
    }
    if let Some(policies) = body.policies {
        spec.policies = policies;
    }
    check_firewall(&spec.firewall_rules)?;
    // Also when only the interfaces change: a policy's subnet or next hop
    // must stay attached.
    check_policies(&spec.policies, &attached(&mut tx, &spec.interfaces).await?)?;
    floating_ips::check_still_reached(&mut tx, &id, &spec).await?;
    super::loadbalancers::check_still_served(&mut tx, &id, &spec).await?;
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<Router>(updated)
}

#[utoipa::path(delete, path = "/routers/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_router(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<Router>(&state, &principal, Action::Delete, &id, &headers).await?;
    floating_ips::check_still_reached(&mut tx, &id, &RouterSpec::default()).await?;
    super::loadbalancers::check_still_served(&mut tx, &id, &RouterSpec::default()).await?;
    finish_delete::<Router>(tx, &record).await
}
