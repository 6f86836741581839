//! `/external-networks`: the provider networks through which routers reach
//! the outside (Neutron's `router:external` networks). A system admin names
//! the physical network each one is on; every host's agent plugs its data
//! plane into the interface it was started with for that name (`keel up
//! --uplink NAME=IFACE`). Router gateways and floating IPs take their
//! addresses from its pools. Every tenant reads them (to pick one); only
//! system admins change them. ACTIVE while a host's data plane is plugged
//! into it.

use std::collections::HashSet;
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
use super::floating_ips::{self, FloatingIpSpec};
use super::listing::{ListQuery, Page};
use super::networks::{present, validate_subnet, AllocationPool, SubnetCreate, SubnetSpec};
use super::ports::choose_ip;
use super::problem::{ApiError, Problem};
use super::records::{self, to_json, Meta, NewRecord, Record, PENDING};
use super::respond::{begin_change, created, finish_delete, get_one, list_page, ok, Resource};
use super::routers::{self, RouterSpec};
use super::AppState;
use crate::store::DbConnection;

pub const KIND: &str = "external_network";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExternalNetworkSpec {
    /// The name hosts map to an interface (`keel up --uplink NAME=IFACE`).
    pub physical_network: String,
    /// IPv4 only: the data plane's NAT is IPv4.
    #[schema(value_type = String)]
    pub cidr: IpNet,
    /// The upstream router: the default route of routers with a gateway
    /// here. `null`: only the external subnet itself is reachable.
    #[schema(value_type = Option<String>)]
    pub gateway_ip: Option<IpAddr>,
    /// Where router gateways and floating IPs are allocated.
    pub allocation_pools: Vec<AllocationPool>,
    #[schema(value_type = Vec<String>)]
    pub reserved_ips: Vec<IpAddr>,
    pub description: String,
}

impl ExternalNetworkSpec {
    /// The addressing as a subnet's, for the shared allocator.
    fn as_subnet(&self) -> SubnetSpec {
        SubnetSpec {
            vpc_id: String::new(),
            cidr: self.cidr,
            gateway_ip: self.gateway_ip,
            allocation_pools: self.allocation_pools.clone(),
            reserved_ips: self.reserved_ips.clone(),
            dns_servers: Vec::new(),
            enable_dhcp: false,
            description: String::new(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExternalNetwork {
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(flatten)]
    pub spec: ExternalNetworkSpec,
    pub status_reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalNetworkCreate {
    pub name: String,
    pub physical_network: String,
    #[schema(value_type = String)]
    pub cidr: String,
    /// Defaults to the first host address; `null` for none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub gateway_ip: Option<Option<IpAddr>>,
    /// Defaults to every host address except the gateway.
    pub allocation_pools: Option<Vec<AllocationPool>>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub reserved_ips: Vec<IpAddr>,
    #[serde(default)]
    pub description: String,
}

/// Addressing is fixed at create (gateways and floating IPs hold addresses).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalNetworkUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExternalNetworkPage {
    pub items: Vec<ExternalNetwork>,
    pub next_cursor: Option<String>,
}

impl Resource for ExternalNetwork {
    const KIND: &'static str = KIND;
    const FAMILY: Family = Family::ExternalNetwork;
    const SYSTEM_WIDE: bool = true;

    fn from_record(record: Record) -> Result<Self, ApiError> {
        let status_reason = if record.meta.status == PENDING {
            "not realized: no host's data plane is plugged into it (keel up --uplink)".into()
        } else {
            String::new()
        };
        Ok(ExternalNetwork {
            spec: record.spec()?,
            meta: record.meta,
            status_reason,
        })
    }
}

/// A physical network name: what `--uplink NAME=IFACE` matches.
fn check_physical_network(name: &str) -> Result<(), ApiError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "physical_network",
            "must be 1-32 letters, digits, '_' or '-'",
        ))
    }
}

/// The external network `id`, or a 422 on `field`.
pub async fn referenced(
    conn: &mut DbConnection,
    field: &str,
    id: &str,
) -> Result<(Record, ExternalNetworkSpec), ApiError> {
    match records::get(conn, KIND, id).await? {
        Some(r) => {
            let spec = r.spec()?;
            Ok((r, spec))
        }
        None => Err(ApiError::invalid(
            field,
            format!("no external network {id}"),
        )),
    }
}

/// Every router's gateway on the external network `id`: (router, address).
async fn gateways_on(conn: &mut DbConnection, id: &str) -> Result<Vec<(Record, IpAddr)>, ApiError> {
    let mut out = Vec::new();
    for router in records::all(conn, routers::KIND).await? {
        let spec: RouterSpec = router.spec()?;
        if let Some(gw) = spec
            .external_gateway
            .filter(|g| g.external_network_id == id)
        {
            out.push((router, gw.external_ip));
        }
    }
    Ok(out)
}

/// An address of the external network for a router gateway or a floating
/// IP: `requested` if free, else the first free one of the pools (409 when
/// none is left). Addresses in use: every gateway and floating IP on it.
pub async fn allocate(
    conn: &mut DbConnection,
    network: &Record,
    requested: Option<IpAddr>,
    field: &str,
) -> Result<IpAddr, ApiError> {
    let spec: ExternalNetworkSpec = network.spec()?;
    let mut used: HashSet<IpAddr> = gateways_on(conn, &network.meta.id)
        .await?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    for fip in records::children(conn, floating_ips::KIND, &network.meta.id).await? {
        used.insert(fip.spec::<FloatingIpSpec>()?.floating_ip_address);
    }
    choose_ip(&spec.as_subnet(), &used, requested, field).map_err(|e| match e {
        ApiError::Conflict(m) => {
            ApiError::Conflict(format!("external network {}: {m}", network.meta.name))
        }
        other => other,
    })
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_external_network, list_external_networks))
        .routes(routes!(
            get_external_network,
            update_external_network,
            delete_external_network
        ))
}

#[utoipa::path(post, path = "/external-networks", tag = "networks", request_body = ExternalNetworkCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key and body")),
    responses(
        (status = 201, description = "Stored; PENDING until a host's data plane is plugged into it", body = ExternalNetwork),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn create_external_network(
    State(state): State<AppState>,
    principal: Principal,
    ValidJson(body): ValidJson<ExternalNetworkCreate>,
) -> Result<Response, ApiError> {
    principal.require(Family::ExternalNetwork, Action::Create)?;
    check_name("name", &body.name)?;
    check_physical_network(&body.physical_network)?;
    let addressing = validate_subnet(SubnetCreate {
        name: body.name.clone(),
        vpc_id: String::new(),
        cidr: body.cidr,
        gateway_ip: body.gateway_ip,
        allocation_pools: body.allocation_pools,
        reserved_ips: body.reserved_ips,
        dns_servers: Vec::new(),
        enable_dhcp: false,
        description: body.description,
    })?;
    if !addressing.cidr.addr().is_ipv4() {
        return Err(ApiError::invalid(
            "cidr",
            "IPv6 external networks are not supported yet (the data plane's NAT is IPv4)",
        ));
    }
    let spec = ExternalNetworkSpec {
        physical_network: body.physical_network,
        cidr: addressing.cidr,
        gateway_ip: addressing.gateway_ip,
        allocation_pools: addressing.allocation_pools,
        reserved_ips: addressing.reserved_ips,
        description: addressing.description,
    };
    let mut tx = state.store.begin_write().await?;
    if records::all(&mut tx, KIND)
        .await?
        .iter()
        .any(|n| n.meta.name == body.name)
    {
        return Err(ApiError::Conflict(format!(
            "an external network named {} exists",
            body.name
        )));
    }
    let record = records::insert(
        &mut tx,
        NewRecord {
            kind: KIND,
            vdc_id: None,
            parent_id: None,
            name: &body.name,
            spec: to_json(&spec)?,
            status: PENDING,
        },
    )
    .await?;
    tx.commit().await?;
    let location = format!("/api/v1/external-networks/{}", record.meta.id);
    let revision = record.meta.revision;
    Ok(created(
        &location,
        revision,
        &ExternalNetwork::from_record(record)?,
    ))
}

#[utoipa::path(get, path = "/external-networks", tag = "networks", params(ListQuery),
    responses((status = 200, description = "One page (every tenant sees them all)", body = ExternalNetworkPage)), security(("bearer" = [])))]
async fn list_external_networks(
    State(state): State<AppState>,
    principal: Principal,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Result<Json<ExternalNetworkPage>, ApiError> {
    let Page { items, next_cursor } =
        list_page::<ExternalNetwork>(&state, &principal, &query).await?;
    Ok(Json(ExternalNetworkPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/external-networks/{id}", tag = "networks", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The external network", body = ExternalNetwork),
        (status = 404, description = "Not found", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn get_external_network(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<ExternalNetwork>(&state, &principal, &id).await
}

#[utoipa::path(patch, path = "/external-networks/{id}", tag = "networks", request_body = ExternalNetworkUpdate,
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 200, description = "Updated", body = ExternalNetwork),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn update_external_network(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<ExternalNetworkUpdate>,
) -> Result<Response, ApiError> {
    let (mut tx, record) =
        begin_change::<ExternalNetwork>(&state, &principal, Action::Update, &id, &headers).await?;
    let mut spec: ExternalNetworkSpec = record.spec()?;
    let name = body.name.unwrap_or_else(|| record.meta.name.clone());
    check_name("name", &name)?;
    if let Some(d) = body.description {
        check_description(&d)?;
        spec.description = d;
    }
    let updated = records::update(&mut tx, &record, KIND, &name, to_json(&spec)?).await?;
    tx.commit().await?;
    ok::<ExternalNetwork>(updated)
}

#[utoipa::path(delete, path = "/external-networks/{id}", tag = "networks",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "ETag from the last read")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "A router gateway or floating IP is on it", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed since read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn delete_external_network(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (mut tx, record) =
        begin_change::<ExternalNetwork>(&state, &principal, Action::Delete, &id, &headers).await?;
    if let Some((router, _)) = gateways_on(&mut tx, &id).await?.first() {
        return Err(ApiError::Conflict(format!(
            "router {} has its gateway on it",
            router.meta.id
        )));
    }
    if let Some(fip) = records::children(&mut tx, floating_ips::KIND, &id)
        .await?
        .first()
    {
        return Err(ApiError::Conflict(format!(
            "floating IP {} is allocated from it",
            fip.meta.name
        )));
    }
    finish_delete::<ExternalNetwork>(tx, &record).await
}
