//! `/vpcs` and `/subnets`: VPC networks.
//!
//! Every network resource (VPC, subnet, router, security group, port) is
//! `PENDING`, with `status_reason` saying so, until the host agent reports
//! that a data plane serves it (a VM's NIC brought it onto a host): then
//! `ACTIVE`, and `PENDING` again once nothing uses it.

use std::net::IpAddr;

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
use super::extract::{check_description, check_name, ValidJson, ValidQuery};
use super::listing::{ListQuery, Page};
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{
    begin_change, created, finish_delete, get_one, list_page, ok, referenced_vdc, target_vdc,
    Resource,
};
use super::AppState;

pub const NOT_REALIZED: &str = "not realized: no data plane serves it yet";

/// Why a network resource is not ACTIVE: nothing, once a data plane
/// serves it (the host agent reports that).
pub fn not_realized(status: &str) -> String {
    if status == PENDING {
        NOT_REALIZED.into()
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------- VPCs

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct VpcSpec {
    description: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Vpc {
    #[serde(flatten)]
    pub meta: Meta,
    pub description: String,
    /// Why the status is what it is.
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VpcCreate {
    pub name: String,
    /// Owning VDC; tenants may omit it (their own VDC).
    pub vdc_id: Option<String>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VpcUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VpcPage {
    pub items: Vec<Vpc>,
    pub next_cursor: Option<String>,
}

impl Resource for Vpc {
    const KIND: &'static str = "vpc";
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let reason = not_realized(&record.meta.status);
        let spec: VpcSpec = record.spec()?;
        Ok(Vpc {
            meta: record.meta,
            description: spec.description,
            status_reason: reason,
        })
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_vpc, list_vpcs))
        .routes(routes!(get_vpc, update_vpc, delete_vpc))
        .routes(routes!(create_subnet, list_subnets))
        .routes(routes!(get_subnet, update_subnet, delete_subnet))
}

#[utoipa::path(post, path = "/vpcs", tag = "networks", request_body = VpcCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored; PENDING until a data plane realizes it", body = Vpc),
        (status = 409, description = "VDC network quota exceeded", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_vpc(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<VpcCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    check_description(&body.description)?;
    let vdc_id = target_vdc(&principal, body.vdc_id)?;
    let mut tx = state.store.begin_write().await?;
    let vdc = referenced_vdc(&mut tx, &principal, "vdc_id", &vdc_id).await?;
    // Counted inside the transaction that inserts: SQLite serializes
    // writers, so two racing creates cannot both pass the check.
    if let Some(limit) = super::vdcs::quota_of(&vdc)?.networks {
        if records::count(&mut tx, "vpc", &vdc_id).await? >= limit {
            return Err(ApiError::QuotaExceeded {
                resource: "networks",
                limit,
            });
        }
    }
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: "vpc",
            vdc_id: Some(&vdc_id),
            parent_id: Some(&vdc_id),
            name: &body.name,
            spec: to_json(&VpcSpec {
                description: body.description,
            })?,
            status: PENDING,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/vpcs/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(&location, revision, &Vpc::from_record(record)?))
}

#[utoipa::path(get, path = "/vpcs", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page", body = VpcPage)), security(("bearer" = [])))]
async fn list_vpcs(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<VpcPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Vpc>(&state, &principal, &query).await?;
    Ok(Json(VpcPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/vpcs/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The VPC", body = Vpc),
        (status = 404, description = "No such VPC (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_vpc(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Vpc>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/vpcs/{id}", tag = "networks", request_body = VpcUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = Vpc),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_vpc(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<VpcUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<Vpc>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: VpcSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    let updated = records::update(&mut tx, &record, "vpc", &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<Vpc>(updated)
}

#[utoipa::path(delete, path = "/vpcs/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "Still has subnets", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_vpc(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tx, record) =
        begin_change::<Vpc>(&state, &principal, Action::Delete, &id, &headers).await?;
    finish_delete::<Vpc>(tx, &record).await
}

// ---------------------------------------------------------------- subnets

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocationPool {
    #[schema(value_type = String)]
    pub start: IpAddr,
    #[schema(value_type = String)]
    pub end: IpAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubnetSpec {
    pub vpc_id: String,
    /// Network address and prefix, IPv4 or IPv6 (`10.0.0.0/24`, `fd00::/64`).
    #[schema(value_type = String)]
    pub cidr: IpNet,
    #[schema(value_type = Option<String>)]
    pub gateway_ip: Option<IpAddr>,
    pub allocation_pools: Vec<AllocationPool>,
    #[schema(value_type = Vec<String>)]
    pub reserved_ips: Vec<IpAddr>,
    #[schema(value_type = Vec<String>)]
    pub dns_servers: Vec<IpAddr>,
    pub enable_dhcp: bool,
    pub description: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Subnet {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: SubnetSpec,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubnetCreate {
    pub name: String,
    pub vpc_id: String,
    #[schema(value_type = String)]
    pub cidr: String,
    /// Defaults to the first host address; `null` for no gateway.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub gateway_ip: Option<Option<IpAddr>>,
    /// Defaults to every host address except the gateway.
    pub allocation_pools: Option<Vec<AllocationPool>>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub reserved_ips: Vec<IpAddr>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub dns_servers: Vec<IpAddr>,
    #[serde(default = "yes")]
    pub enable_dhcp: bool,
    #[serde(default)]
    pub description: String,
}

/// Tells an explicit `null` (no gateway) from an absent field (default).
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}
pub(crate) fn yes() -> bool {
    true
}

/// CIDR and pools are fixed at create (ports hold addresses from them).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubnetUpdate {
    pub name: Option<String>,
    #[schema(value_type = Option<Vec<String>>)]
    pub dns_servers: Option<Vec<IpAddr>>,
    pub enable_dhcp: Option<bool>,
    pub description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubnetPage {
    pub items: Vec<Subnet>,
    pub next_cursor: Option<String>,
}

impl Resource for Subnet {
    const KIND: &'static str = "subnet";
    const FAMILY: Family = Family::Network;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let reason = not_realized(&record.meta.status);
        Ok(Subnet {
            spec: record.spec()?,
            meta: record.meta,
            status_reason: reason,
        })
    }
}

pub(crate) fn as_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Host addresses usable in `net`: IPv4 excludes network and broadcast
/// (except /31 and /32), IPv6 excludes the subnet-router anycast address.
pub(crate) fn usable(net: &IpNet, ip: IpAddr) -> bool {
    if !net.contains(&ip) {
        return false;
    }
    match net {
        IpNet::V4(n) if n.prefix_len() < 31 => {
            ip != IpAddr::from(n.network()) && ip != IpAddr::from(n.broadcast())
        }
        IpNet::V6(n) if n.prefix_len() < 127 => ip != IpAddr::from(n.network()),
        _ => true,
    }
}

fn first_host(net: &IpNet) -> Option<IpAddr> {
    net.hosts().find(|ip| usable(net, *ip))
}

pub(crate) fn from_u128(v: u128, like: &IpNet) -> Option<IpAddr> {
    match like {
        IpNet::V4(_) => u32::try_from(v)
            .ok()
            .map(|v| IpAddr::from(std::net::Ipv4Addr::from(v))),
        IpNet::V6(_) => Some(IpAddr::from(std::net::Ipv6Addr::from(v))),
    }
}

/// Every usable host address, split around the gateway.
fn default_pools(cidr: &IpNet, gateway: Option<IpAddr>) -> Vec<AllocationPool> {
    let Some(first) = first_host(cidr) else {
        return vec![];
    };
    let last = match cidr {
        IpNet::V4(n) => u128::from(u32::from(n.broadcast())).saturating_sub(1),
        IpNet::V6(n) => u128::from(n.broadcast()),
    };
    let (first, last) = (as_u128(first), last);
    let mut ranges = vec![(first, last)];
    if let Some(gw) = gateway
        .map(as_u128)
        .filter(|gw| (first..=last).contains(gw))
    {
        ranges = vec![(first, gw.wrapping_sub(1)), (gw.wrapping_add(1), last)];
        ranges.retain(|(s, e)| s <= e && *s >= first && *e <= last);
    }
    ranges
        .into_iter()
        .filter_map(|(s, e)| {
            Some(AllocationPool {
                start: from_u128(s, cidr)?,
                end: from_u128(e, cidr)?,
            })
        })
        .collect()
}

/// Validates a create body into the stored spec (everything but overlap,
/// which needs the VPC's other subnets).
pub(crate) fn validate_subnet(body: SubnetCreate) -> Result<SubnetSpec, ApiError> {
    let cidr: IpNet = body.cidr.parse().map_err(|_| {
        ApiError::invalid(
            "cidr",
            format!("{:?} is not an IPv4 or IPv6 CIDR", body.cidr),
        )
    })?;
    if cidr.trunc() != cidr {
        return Err(ApiError::invalid(
            "cidr",
            format!("host bits set: did you mean {}?", cidr.trunc()),
        ));
    }
    let too_small = match cidr {
        IpNet::V4(n) => n.prefix_len() > 30,
        IpNet::V6(n) => n.prefix_len() > 126,
    };
    if too_small {
        return Err(ApiError::invalid(
            "cidr",
            "prefix too long for a subnet (max /30 for IPv4, /126 for IPv6)",
        ));
    }
    let gateway_ip = match body.gateway_ip {
        None => first_host(&cidr),
        Some(None) => None,
        Some(Some(gw)) => {
            if !usable(&cidr, gw) {
                return Err(ApiError::invalid(
                    "gateway_ip",
                    format!("{gw} is not a host address inside {cidr}"),
                ));
            }
            Some(gw)
        }
    };
    let allocation_pools = match body.allocation_pools {
        Some(pools) => pools,
        None => default_pools(&cidr, gateway_ip),
    };
    let mut previous: Option<(u128, u128)> = None;
    let mut sorted: Vec<(usize, u128, u128)> = Vec::new();
    for (i, pool) in allocation_pools.iter().enumerate() {
        let field = format!("allocation_pools[{i}]");
        if !usable(&cidr, pool.start) || !usable(&cidr, pool.end) {
            return Err(ApiError::invalid(
                field,
                format!("must lie inside {cidr} (host addresses only)"),
            ));
        }
        let (s, e) = (as_u128(pool.start), as_u128(pool.end));
        if s > e {
            return Err(ApiError::invalid(field, "start is after end"));
        }
        if let Some(gw) = gateway_ip {
            if (s..=e).contains(&as_u128(gw)) {
                return Err(ApiError::invalid(
                    field,
                    format!("contains the gateway {gw}"),
                ));
            }
        }
        sorted.push((i, s, e));
    }
    sorted.sort_by_key(|(_, s, _)| *s);
    for (i, s, e) in sorted {
        if let Some((_, pe)) = previous {
            if s <= pe {
                return Err(ApiError::invalid(
                    format!("allocation_pools[{i}]"),
                    "overlaps another pool",
                ));
            }
        }
        previous = Some((s, e));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, ip) in body.reserved_ips.iter().enumerate() {
        if !usable(&cidr, *ip) {
            return Err(ApiError::invalid(
                format!("reserved_ips[{i}]"),
                format!("{ip} is not a host address inside {cidr}"),
            ));
        }
        if !seen.insert(*ip) {
            return Err(ApiError::invalid(
                format!("reserved_ips[{i}]"),
                format!("{ip} listed twice"),
            ));
        }
    }
    if body.dns_servers.len() > 8 {
        return Err(ApiError::invalid("dns_servers", "at most 8"));
    }
    check_description(&body.description)?;
    Ok(SubnetSpec {
        vpc_id: body.vpc_id,
        cidr,
        gateway_ip,
        allocation_pools,
        reserved_ips: body.reserved_ips,
        dns_servers: body.dns_servers,
        enable_dhcp: body.enable_dhcp,
        description: body.description,
    })
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[utoipa::path(post, path = "/subnets", tag = "networks", request_body = SubnetCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored; PENDING until a data plane realizes it", body = Subnet),
        (status = 409, description = "Overlaps another subnet of the VPC", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_subnet(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<SubnetCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::Network, Action::Create)?;
    check_name("name", &body.name)?;
    let name = body.name.clone();
    let spec = validate_subnet(body)?;
    let mut tx = state.store.begin_write().await?;
    let vpc = match records::get(&mut tx, "vpc", &spec.vpc_id).await? {
        Some(vpc) if principal.sees(vpc.meta.vdc_id.as_deref()) => vpc,
        _ => {
            return Err(ApiError::invalid(
                "vpc_id",
                format!("no VPC {}", spec.vpc_id),
            ))
        }
    };
    for other in records::children(&mut tx, "subnet", &vpc.meta.id).await? {
        let other_spec: SubnetSpec = other.spec()?;
        if overlaps(&other_spec.cidr, &spec.cidr) {
            return Err(ApiError::Conflict(format!(
                "cidr {} overlaps subnet {} ({}) in VPC {}",
                spec.cidr, other.meta.name, other_spec.cidr, vpc.meta.id
            )));
        }
    }
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: "subnet",
            vdc_id: vpc.meta.vdc_id.as_deref(),
            parent_id: Some(&vpc.meta.id),
            name: &name,
            spec: to_json(&spec)?,
            status: PENDING,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/subnets/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(&location, revision, &Subnet::from_record(record)?))
}

#[utoipa::path(get, path = "/subnets", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page; filter by VPC with parent_id", body = SubnetPage)), security(("bearer" = [])))]
async fn list_subnets(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<SubnetPage>, ApiError> {
    let Page { items, next_cursor } = list_page::<Subnet>(&state, &principal, &query).await?;
    Ok(Json(SubnetPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/subnets/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The subnet", body = Subnet),
        (status = 404, description = "No such subnet (or not visible)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_subnet(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<Subnet>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/subnets/{id}", tag = "networks", request_body = SubnetUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = Subnet),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_subnet(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<SubnetUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<Subnet>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: SubnetSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(dns) = body.dns_servers {
        if dns.len() > 8 {
            return Err(ApiError::invalid("dns_servers", "at most 8"));
        }
        spec.dns_servers = dns;
    }
    if let Some(dhcp) = body.enable_dhcp {
        spec.enable_dhcp = dhcp;
    }
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    let updated = records::update(&mut tx, &record, "subnet", &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<Subnet>(updated)
}

#[utoipa::path(delete, path = "/subnets/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_subnet(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<Subnet>(&state, &principal, Action::Delete, &id, &headers).await?;
    if super::routers::subnet_in_use(&mut tx, &record).await? {
        return Err(ApiError::Conflict(format!(
            "subnet {id} has a router interface"
        )));
    }
    finish_delete::<Subnet>(tx, &record).await
}
